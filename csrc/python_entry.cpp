// Fast Python entry points to the operators, for eager calls.
//
// torch.ops.koemorph_fused.* matches its Python arguments against the schema
// and builds a boxed stack: at B = 4 that was a third of the instructions of
// a forward call (callgrind). These functions accept exactly the expected
// types (plain torch.Tensor, None, bool, torch.dtype) and call the very same
// operators through the dispatcher, unboxed, so every dispatch key (autograd,
// fake tensors, dispatch modes, CUDA) behaves as with torch.ops. For anything
// else -- a tensor subclass, another argument type -- they return
// NotImplemented and the caller falls back to torch.ops (which also handles
// __torch_function__).
#include "python_entry.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include "loss_autograd.h"
#include "loss_inputs.h"
#include "operator_handles.h"

namespace koemorph_fused {
namespace {

// Large inputs run with the GIL released, so that other Python threads can go on.
constexpr int64_t kReleaseGilElements = 1 << 16;

bool is_tensor(PyObject* o) { return THPVariable_CheckExact(o); }
bool is_optional_tensor(PyObject* o) { return o == Py_None || is_tensor(o); }

std::optional<at::Tensor> optional_tensor(PyObject* o) {
  if (o == Py_None) return std::nullopt;
  return THPVariable_Unpack(o);
}

// Whether a torch.func transform (vmap, grad, ...) is active. Its thread-local
// state outlives the first transform (torch.compile's tracing creates it too),
// so that it exists says nothing; torch.func includes its front-mode dispatch
// key exactly while its layer stack is not empty.
bool functorch_transform_active() {
  return c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// Runs f, without the GIL when the inputs are large.
template <class F>
auto call_releasing_gil_if(bool large, F&& f) -> decltype(f()) {
  if (large) {
    pybind11::gil_scoped_release no_gil;
    return f();
  }
  return f();
}

PyObject* wrap(std::initializer_list<at::Tensor*> tensors) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(tensors.size()));
  if (tuple == nullptr) return nullptr;
  Py_ssize_t i = 0;
  for (at::Tensor* t : tensors) {
    PyObject* item = THPVariable_Wrap(std::move(*t));
    if (item == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, i++, item);
  }
  return tuple;
}

}  // namespace

PyObject* python_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10 || !is_tensor(args[0]) || !is_tensor(args[1]) || !is_optional_tensor(args[2]) ||
      !is_optional_tensor(args[3]) || !is_optional_tensor(args[4]) || !is_tensor(args[5]) ||
      !is_tensor(args[6]) || !PyBool_Check(args[7]) || !PyBool_Check(args[8]) ||
      !PyBool_Check(args[9])) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const auto& op = forward_operator();
  const at::Tensor& pred = THPVariable_Unpack(args[0]);
  const auto prev = optional_tensor(args[2]);
  const auto raw = optional_tensor(args[3]);
  const auto continuity = optional_tensor(args[4]);
  auto call = [&] {
    return op.call(pred, THPVariable_Unpack(args[1]), prev, raw, continuity,
                   THPVariable_Unpack(args[5]), THPVariable_Unpack(args[6]), args[7] == Py_True,
                   args[8] == Py_True, args[9] == Py_True);
  };
  ForwardOutputs out = call_releasing_gil_if(pred.numel() >= kReleaseGilElements, call);
  auto& [total, terms, grad_pred, grad_target, grad_raw] = out;
  return wrap({&total, &terms, &grad_pred, &grad_target, &grad_raw});
  END_HANDLE_TH_ERRORS
}

PyObject* python_scale(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !is_tensor(args[0]) || !is_tensor(args[1]) || !is_tensor(args[2]) ||
      !is_tensor(args[3]) || !THPDtype_Check(args[4])) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const auto& op = scale_operator();
  const at::Tensor& grad_pred = THPVariable_Unpack(args[1]);
  const at::ScalarType dtype = reinterpret_cast<THPDtype*>(args[4])->scalar_type;
  auto call = [&] {
    return op.call(THPVariable_Unpack(args[0]), grad_pred, THPVariable_Unpack(args[2]),
                   THPVariable_Unpack(args[3]), dtype);
  };
  auto out = call_releasing_gil_if(grad_pred.numel() >= kReleaseGilElements, call);
  auto& [a, b, c] = out;
  return wrap({&a, &b, &c});
  END_HANDLE_TH_ERRORS
}

PyObject* python_loss(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !is_tensor(args[0]) || !is_tensor(args[1]) || !is_optional_tensor(args[2]) ||
      !is_optional_tensor(args[3]) || !is_optional_tensor(args[4]) || !is_tensor(args[5]) ||
      !is_tensor(args[6]) || functorch_transform_active()) {
    // Tensor subclasses, and torch.func transforms (which support only
    // Python autograd Functions), take the Python Function.
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& pred = THPVariable_Unpack(args[0]);
  const auto prev = optional_tensor(args[2]);
  const auto raw = optional_tensor(args[3]);
  const auto continuity = optional_tensor(args[4]);
  auto [total, terms] = temporal_loss_with_autograd(
      pred, THPVariable_Unpack(args[1]), prev, raw, continuity, THPVariable_Unpack(args[5]),
      THPVariable_Unpack(args[6]), pred.numel() >= kReleaseGilElements);
  return wrap({&total, &terms});
  END_HANDLE_TH_ERRORS
}

PyObject* python_sequence_loss(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  bool plain = nargs == 12 && is_tensor(args[0]) && is_tensor(args[1]) && is_tensor(args[8]) &&
               is_tensor(args[9]) && is_optional_tensor(args[10]) && PyLong_CheckExact(args[11]);
  for (int i = 2; plain && i < 8; ++i) plain = is_optional_tensor(args[i]);
  if (!plain || functorch_transform_active()) {
    Py_RETURN_NOTIMPLEMENTED;  // as in python_loss
  }
  const int64_t reduction = PyLong_AsLongLong(args[11]);
  if (reduction == -1 && PyErr_Occurred()) return nullptr;
  const at::Tensor& pred = THPVariable_Unpack(args[0]);
  auto [total, terms, counts] = sequence_loss_with_autograd(
      pred, THPVariable_Unpack(args[1]), optional_tensor(args[2]), optional_tensor(args[3]),
      optional_tensor(args[4]), optional_tensor(args[5]), optional_tensor(args[6]),
      optional_tensor(args[7]), THPVariable_Unpack(args[8]), THPVariable_Unpack(args[9]),
      optional_tensor(args[10]), reduction, pred.numel() >= kReleaseGilElements);
  return wrap({&total, &terms, &counts});
  END_HANDLE_TH_ERRORS
}

}  // namespace koemorph_fused
