// The Python module `autolr_fast._C`.
//
// Loading it registers the autolr_fast ops' kernels with torch's dispatcher (the other translation
// units). It also has one function, `mlrsnet_step_cpu(loss, h, c, weights, gamma, rate, lrs,
// scales, counters=None)`: the CPU controller step (and the scheduler's counters) called straight
// from Python, without the generic
// Python -> dispatcher argument conversion, which costs more than the step itself (a few us
// against ~1 us). It takes plain tensors and nn.Parameters only and returns NotImplemented
// for anything else (tensor subclasses, FakeTensors...), so the caller then uses
// torch.ops.autolr_fast.mlrsnet_step_, which handles every case. Same kernel, same checks.
// And `tensor_layout_key(tensors)`, the memory layout of a list of tensors as one bytes
// object, for the Triton step's per-step check that its cached launch is still valid.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/autograd/python_variable.h>

#include "mlrsnet_cpu.h"

namespace {

PyObject* g_parameter_type = nullptr;  // torch.nn.Parameter (a plain-tensor subclass)

bool plain_tensor(PyObject* obj) {
  if (THPVariable_CheckExact(obj)) return true;
  return g_parameter_type != nullptr && reinterpret_cast<PyObject*>(Py_TYPE(obj)) == g_parameter_type;
}

// Appends the tensors of a list/tuple; false if an entry is not a plain tensor.
template <typename Vec>
bool unpack_tensors(PyObject* seq, Vec& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!plain_tensor(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
  }
  return true;
}

PyObject* mlrsnet_step_cpu_py(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8 && nargs != 9) {
    PyErr_SetString(PyExc_TypeError,
                    "mlrsnet_step_cpu(loss, h, c, weights, gamma, rate, lrs, scales, counters=None): 8 or 9 arguments");
    return nullptr;
  }
  for (int i : {0, 1, 2, 4, 5})
    if (!plain_tensor(args[i])) Py_RETURN_NOTIMPLEMENTED;
  const bool count = nargs == 9 && args[8] != Py_None;
  if (count && !plain_tensor(args[8])) Py_RETURN_NOTIMPLEMENTED;
  c10::SmallVector<at::Tensor, 32> weights;
  c10::SmallVector<at::Tensor, 8> lrs;
  c10::SmallVector<double, 8> scales;
  if (!unpack_tensors(args[3], weights) || !unpack_tensors(args[6], lrs)) Py_RETURN_NOTIMPLEMENTED;
  if (!PyList_Check(args[7]) && !PyTuple_Check(args[7])) Py_RETURN_NOTIMPLEMENTED;
  const Py_ssize_t ns = PySequence_Fast_GET_SIZE(args[7]);
  PyObject** items = PySequence_Fast_ITEMS(args[7]);
  for (Py_ssize_t i = 0; i < ns; ++i) {
    const double v = PyFloat_AsDouble(items[i]);
    if (v == -1.0 && PyErr_Occurred()) return nullptr;
    scales.push_back(v);
  }
  try {
    if (count) autolr_fast::check_counters_cpu(THPVariable_Unpack(args[8]));  // before the state moves
    at::Tensor ok = autolr_fast::mlrsnet_step_cpu(
        THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2]),
        at::TensorList(weights.data(), weights.size()), THPVariable_Unpack(args[4]), THPVariable_Unpack(args[5]),
        at::TensorList(lrs.data(), lrs.size()), at::ArrayRef<double>(scales.data(), scales.size()));
    if (count) autolr_fast::count_step_cpu(THPVariable_Unpack(args[0]), *ok.const_data_ptr<bool>(),
                                           THPVariable_Unpack(args[8]));
    return THPVariable_Wrap(std::move(ok));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// tensor_layout_key(tensors): one bytes object naming where each tensor's memory is and how it
// is laid out (data pointer, device, dtype, sizes, strides). Two calls give equal keys exactly
// when every tensor kept all of these; the Triton step's cached launch compares them every step
// (autolr_fast/ops/triton_kernels.py; its Python _layout is the reference).
PyObject* tensor_layout_key_py(PyObject* /*self*/, PyObject* seq) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
    PyErr_SetString(PyExc_TypeError, "tensor_layout_key takes a list or tuple of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  c10::SmallVector<int64_t, 192> key;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) {
        PyErr_Format(PyExc_TypeError, "tensor_layout_key: entry %zd is a %s, not a tensor", i, Py_TYPE(items[i])->tp_name);
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      const c10::Device device = t.device();
      key.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr())));
      key.push_back((static_cast<int64_t>(device.type()) << 32) | static_cast<int64_t>(device.index() + 1));
      key.push_back(static_cast<int64_t>(t.scalar_type()));
      key.push_back(t.dim());
      for (const int64_t size : t.sizes()) key.push_back(size);
      for (const int64_t stride : t.strides()) key.push_back(stride);
    }
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(key.data()),
                                   static_cast<Py_ssize_t>(key.size() * sizeof(int64_t)));
}

PyMethodDef kMethods[] = {
    {"mlrsnet_step_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(mlrsnet_step_cpu_py)), METH_FASTCALL,
     "CPU MLR-SNet step without the dispatcher (plain tensors only; NotImplemented otherwise)."},
    {"tensor_layout_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(tensor_layout_key_py)), METH_O,
     "bytes naming each tensor's data pointer, device, dtype, sizes and strides (equal iff all are)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "autolr_fast C++/CUDA ops (kernels of torch.ops.autolr_fast)", -1,
                       kMethods};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  PyObject* nn_param = PyImport_ImportModule("torch.nn.parameter");
  if (nn_param != nullptr) {
    g_parameter_type = PyObject_GetAttrString(nn_param, "Parameter");  // kept for the process lifetime
    Py_DECREF(nn_param);
  }
  PyErr_Clear();  // without Parameter the fast path just accepts plain tensors only
  return PyModule_Create(&kModule);
}
