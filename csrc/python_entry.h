// Fast Python entry points to the operators (see python_entry.cpp).
#pragma once

#include <Python.h>

namespace koemorph_fused {

// forward(pred, target, prev, raw, continuity, column_weights, weights,
//         grad_pred, grad_target, grad_raw) -> 5-tuple, or NotImplemented
PyObject* python_forward(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
// scale(grad_output, grad_pred, grad_target, grad_raw, dtype) -> 3-tuple, or NotImplemented
PyObject* python_scale(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
// loss(pred, target, prev, raw, continuity, column_weights, weights) ->
//      (total, terms) with the C++ autograd node, or NotImplemented
PyObject* python_loss(PyObject* self, PyObject* const* args, Py_ssize_t nargs);
// sequence_loss(pred, target, raw, prev, prev_target, lengths, mask, continuity,
//               column_weights, weights, counts, reduction) -> (total, terms,
//               counts) with the C++ autograd node, or NotImplemented
PyObject* python_sequence_loss(PyObject* self, PyObject* const* args, Py_ssize_t nargs);

}  // namespace koemorph_fused
