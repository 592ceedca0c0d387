// Operator schemas of koemorph_fused (one place for all backends), and the
// tiny Python module `koemorph_fused._C` whose import loads them.
//
// The kernels are registered per backend in cpu_loss_kernel.cpp and
// cuda/loss_kernel.cu; the fake (meta) kernels and autograd live in Python
// (koemorph_fused/_ops.py, koemorph_fused/_sequence_ops.py) and
// csrc/loss_autograd.cpp.
#include <Python.h>

#include <torch/library.h>

#ifndef KF_CUDA_ARCH_LIST  // e.g. 8.0,8.6,8.9,9.0+PTX (set by the build)
#define KF_CUDA_ARCH_LIST
#endif
#ifndef KF_WITH_CUDA
#define KF_WITH_CUDA 0
#endif

#include "cpu_buffer_pool.h"
#include "python_entry.h"

namespace koemorph_fused {
const char* cpu_kernel_isa();
}

TORCH_LIBRARY(koemorph_fused, m) {
  // `weights` holds the five term weights (float64), on the CPU or on pred's
  // device: a tensor rather than floats, so that changing them recompiles
  // nothing under torch.compile and a CUDA graph can read them on the device.
  // One pass: the five unweighted terms, the weighted total and the gradients
  // of the inputs flagged by grad_pred, grad_target and grad_raw. A gradient
  // that is not asked for comes back as an empty (0,) tensor.
  m.def(
      "temporal_loss_forward(Tensor pred, Tensor target, Tensor? prev, Tensor? raw, "
      "Tensor? continuity, Tensor column_weights, Tensor weights, bool grad_pred, "
      "bool grad_target, bool grad_raw) "
      "-> (Tensor total, Tensor terms, Tensor grad_pred, Tensor grad_target, Tensor grad_raw)");
  // Backward: each saved gradient times grad_output (read on the device), as
  // `dtype` (the input dtype; saved gradients of float16 inputs are float32).
  // Empty inputs give empty outputs.
  m.def(
      "scale_gradients(Tensor grad_output, Tensor grad_pred, Tensor grad_target, Tensor grad_raw, "
      "ScalarType dtype) -> (Tensor, Tensor, Tensor)");
  // Backward that hands the saved gradients over: each of `grads` (any shape,
  // contiguous, one dtype among float16/bfloat16/float32/float64) times
  // grad_output in place, multiplied in the accumulation dtype and rounded
  // once, as scale_gradients. grad_output is read where it lives (on the
  // device: no sync, capture-safe); when it is 1 nothing is written.
  m.def("scale_gradients_(Tensor grad_output, Tensor(a!)[] grads) -> ()");
  // Windows of frames (B, T, C): one pass computing the six per-frame terms
  // (mse, l1, perceptual, temporal, smoothing, velocity), their reduction, this
  // call's counts (|V|, |V|, |V|, |P|, |V| or 0, |P_v|) and the requested
  // gradients of the weighted total. reduction: 0 none, 1 mean, 2 sum.
  // frame_scale (B, T), when given, multiplies each frame's weighted terms
  // (the backward of reduction "none" is this op with reduction 2 and
  // frame_scale = grad_output). docs/spec.md, "Sequences", is the contract.
  m.def(
      "sequence_loss_forward(Tensor pred, Tensor target, Tensor? raw, Tensor? prev, "
      "Tensor? prev_target, Tensor? lengths, Tensor? mask, Tensor? continuity, "
      "Tensor column_weights, Tensor weights, Tensor? counts, Tensor? frame_scale, int reduction, "
      "bool grad_pred, bool grad_target, bool grad_raw) "
      "-> (Tensor total, Tensor terms, Tensor counts, Tensor grad_pred, Tensor grad_target, "
      "Tensor grad_raw)");
}

// Both operators return gradients explicitly and are not differentiable
// themselves: autograd passes them through (their outputs carry no grad_fn).
// koemorph_fused.temporal_loss wraps them in a torch.autograd.Function. The
// fallthrough also spares every call the boxed "autograd not implemented"
// fallback, a measurable share of a small call.
TORCH_LIBRARY_IMPL(koemorph_fused, Autograd, m) {
  m.impl("temporal_loss_forward", torch::CppFunction::makeFallthrough());
  m.impl("scale_gradients", torch::CppFunction::makeFallthrough());
  m.impl("sequence_loss_forward", torch::CppFunction::makeFallthrough());
}
// scale_gradients_ has an Autograd kernel (loss_autograd.cpp): it bumps the
// version counters of the tensors it modifies.

namespace {

PyObject* cpu_kernel(PyObject*, PyObject*) {
  return PyUnicode_FromString(koemorph_fused::cpu_kernel_isa());
}

PyObject* cpu_buffer_pool_stats(PyObject*, PyObject*) {
  const koemorph_fused::BufferPoolStats s = koemorph_fused::buffer_pool_stats();
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "cached_bytes",
                       (long long)s.cached_bytes, "in_use_bytes", (long long)s.in_use_bytes,
                       "peak_in_use_bytes", (long long)s.peak_in_use_bytes, "limit_bytes",
                       (long long)s.limit_bytes, "cap_bytes", (long long)s.cap_bytes, "hits",
                       (long long)s.hits, "misses", (long long)s.misses, "evictions",
                       (long long)s.evictions);
}

PyObject* cpu_buffer_pool_empty_cache(PyObject*, PyObject*) {
  koemorph_fused::buffer_pool_empty_cache();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"forward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(koemorph_fused::python_forward)),
     METH_FASTCALL,
     "temporal_loss_forward for plain tensors without the boxed argument parsing of torch.ops; "
     "NotImplemented for anything else."},
    {"loss", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(koemorph_fused::python_loss)),
     METH_FASTCALL,
     "(total, terms) of the fused loss for plain eager tensors, with the C++ autograd node "
     "(csrc/loss_autograd.cpp); NotImplemented for anything else."},
    {"sequence_loss",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(koemorph_fused::python_sequence_loss)),
     METH_FASTCALL,
     "(total, terms, counts) of the sequence loss for plain eager tensors, with the C++ autograd "
     "node (csrc/loss_autograd.cpp); NotImplemented for anything else."},
    {"scale", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(koemorph_fused::python_scale)),
     METH_FASTCALL,
     "scale_gradients for plain tensors; NotImplemented for anything else."},
    {"cpu_kernel", cpu_kernel, METH_NOARGS,
     "Which build of the CPU kernels runs on this machine: 'AVX2' or 'DEFAULT'."},
    {"cpu_buffer_pool_stats", cpu_buffer_pool_stats, METH_NOARGS,
     "Statistics of the pool of large CPU gradient buffers."},
    {"cpu_buffer_pool_empty_cache", cpu_buffer_pool_empty_cache, METH_NOARGS,
     "Free the idle buffers of the CPU gradient buffer pool."},
    {nullptr, nullptr, 0, nullptr}};

#define KF_STR_(...) #__VA_ARGS__
#define KF_STR(...) KF_STR_(__VA_ARGS__)
#define KF_CAT_(a, b) a##b
#define KF_CAT(a, b) KF_CAT_(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, KF_STR(TORCH_EXTENSION_NAME),
                          "Compiled koemorph_fused operators (registered on import).", -1,
                          methods};

}  // namespace

// TORCH_EXTENSION_NAME is _C for the installed build and another name for a
// just-in-time build (torch.utils.cpp_extension sets it for both).
extern "C" PyMODINIT_FUNC KF_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyModule_AddIntConstant(m, "with_cuda", KF_WITH_CUDA);
  PyModule_AddStringConstant(m, "cuda_arch_list", KF_STR(KF_CUDA_ARCH_LIST));
  // Whether at::parallel_for (inline OpenMP in torch's headers) runs on several
  // threads here; compiled without -fopenmp, it quietly uses one.
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "cpu_openmp", 1);
#else
  PyModule_AddIntConstant(m, "cpu_openmp", 0);
#endif
  return m;
}
