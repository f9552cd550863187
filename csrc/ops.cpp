// The op schemas of namespace metalearn_fast, and the Python module that loads them.
// Kernels live one file per op and device (cpu/, cuda/); autograd lives in autograd/.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <array>
#include <utility>
#include <vector>

#include "cpu/block_cache.h"
#include "cpu/grouped_conv_cpu.h"
#include "cpu/norm_relu_cpu.h"
#include "cpu/small_kernels.h"
#include "metalearn_fast_build_info.h"

TORCH_LIBRARY(metalearn_fast, m) {
  // x [T,N,I]|[N,I], weight [T,O,I]|[O,I], bias [T,O]|[O] -> relu(x @ weight^T + bias) [T,N,O]|[N,O]
  m.def("linear_relu(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  // (grad_x, grad_weight, grad_bias); an entry is None where output_mask says it is not needed
  m.def(
      "linear_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor out, bool[3] output_mask)"
      " -> (Tensor?, Tensor?, Tensor?)");
  // new_params[i] = params[i] - lr[i] * grads[i]; lr holds one tensor shared by all, or one per param
  m.def("sgd_step(Tensor[] params, Tensor[] grads, Tensor[] lr) -> Tensor[]");
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] lr) -> ()");
  // The MAML meta-loss of an MLP over a meta-batch, its gradient w.r.t. params [W0, b0, W1, b1, ...]
  // when compute_grad, and w.r.t. lr (one tensor, or one per param) when compute_lr_grad:
  // (loss, param_grads, lr_grads), a list empty when not asked for. MAML++: with per_step_lr every lr
  // tensor is [inner_steps], one rate per inner step (LSLR); step_weights, one per inner step, make the
  // meta-loss the weighted sum of the query losses after every inner step (the multi-step loss).
  m.def(
      "maml_mlp_meta_grad(Tensor[] params, Tensor[] lr, Tensor x_support, Tensor y_support, Tensor x_query,"
      " Tensor y_query, int inner_steps, bool first_order, str loss, int first_adapted_layer, bool compute_grad,"
      " bool compute_lr_grad, bool per_step_lr=False, float[] step_weights=[]) -> (Tensor, Tensor[], Tensor[])");
  // The same meta-loss as one autograd node, differentiable once w.r.t. params and lr: its forward
  // runs maml_mlp_meta_grad for the gradients the inputs need, its backward scales them.
  m.def(
      "maml_mlp_loss(Tensor[] params, Tensor[] lr, Tensor x_support, Tensor y_support, Tensor x_query,"
      " Tensor y_query, int inner_steps, bool first_order, str loss, int first_adapted_layer,"
      " bool per_step_lr=False, float[] step_weights=[]) -> Tensor");
  // The gradient of the mean loss ("mse": y [N, O]; "cross_entropy": y [N] labels) of an MLP on x [N, I]
  // w.r.t. its params [W0, b0, W1, b1, ...], as one autograd node whose backward is an analytic
  // Hessian-vector product (learn2learn-style adapt() steps, second order, without a graph of small ops).
  m.def("mlp_loss_grad(Tensor[] params, Tensor x, Tensor y, str loss) -> Tensor[]");
  // That loss's Hessian applied to a direction (one tensor per param, None for zero): mlp_loss_grad's backward.
  m.def("mlp_loss_hessian_times(Tensor[] params, Tensor x, Tensor y, str loss, Tensor?[] direction) -> Tensor[]");
  // torch.optim's Adam/AdamW/SGD step on params, from grads, updating the optimizer's state tensors in
  // place; optimizer "adam" or "sgd", settings and state laid out as composite/optimizer.h says.
  m.def(
      "optimizer_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state, str optimizer, float[] settings)"
      " -> ()");
  // One epoch of minibatch training of an MLP: per batch of x [N, I] (in order's order, or sequential),
  // forward, mean loss ("mse": y [N, O]; "cross_entropy": y [N] labels), backward into grads, and the
  // optimizer step on params and state. Returns each batch's loss.
  m.def(
      "mlp_train_epoch_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state, Tensor x, Tensor y,"
      " Tensor? order, int batch_size, str loss, str optimizer, float[] settings) -> Tensor");
  // A MAML meta-step of an MLP: the meta-gradient (maml_mlp_meta_grad) written into grads (params', then
  // lr's when learn_lr), and the optimizer step on params (and lr) and state. Returns the meta-loss.
  m.def(
      "maml_mlp_meta_step_(Tensor(a!)[] params, Tensor(b!)[] lr, Tensor(c!)[] grads, Tensor(d!)[] state,"
      " Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, int inner_steps, bool first_order,"
      " str loss, int first_adapted_layer, bool learn_lr, str optimizer, float[] settings,"
      " bool per_step_lr=False, float[] step_weights=[]) -> Tensor");
  // maml_mlp_meta_step_ on each of S meta-batches in turn, stacked on a first dimension (x_support [S, T, K, I],
  // ...), the optimizer's settings those of the call: the same numbers as S calls. Returns the S meta-losses.
  m.def(
      "maml_mlp_meta_steps_(Tensor(a!)[] params, Tensor(b!)[] lr, Tensor(c!)[] grads, Tensor(d!)[] state,"
      " Tensor x_support, Tensor y_support, Tensor x_query, Tensor y_query, int inner_steps, bool first_order,"
      " str loss, int first_adapted_layer, bool learn_lr, str optimizer, float[] settings,"
      " bool per_step_lr=False, float[] step_weights=[]) -> Tensor");
  // A Reptile meta-step of an MLP, in place: each task adapts a copy of params with inner_steps SGD steps
  // (rate inner_lr) on its support loss, then p += outer_lr * (mean adapted p - p). Returns the mean support
  // loss at the first inner step.
  m.def(
      "reptile_mlp_step_(Tensor(a!)[] params, Tensor x_support, Tensor y_support, int inner_steps, float inner_lr,"
      " float outer_lr, str loss) -> Tensor");
}

namespace {

// linear_relu(x, weight, bias) called straight from Python. torch.ops boxes every argument into
// an IValue and parses it against the schema, which costs more than a meta-batch layer's
// arithmetic; this calls the same op through the dispatcher unboxed (autograd included).
PyObject* linear_relu_unboxed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) || !THPVariable_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "linear_relu: expected three tensors (x, weight, bias)");
    return nullptr;
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::linear_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return THPVariable_Wrap(op.call(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), THPVariable_Unpack(args[2])));
  END_HANDLE_TH_ERRORS
}

// The arguments of an unboxed entry point, read from Python objects; a wrong type raises TypeError naming the
// argument (the Python wrappers pass the right types; these guard against misuse).
struct Arguments {
  const char* op;
  PyObject* const* args;

  [[noreturn]] void wrong(Py_ssize_t i, const char* name, const char* expected) const {
    throw torch::TypeError(c10::str(op, ": argument ", i, " (", name, ") must be ", expected, ", got ",
                                    Py_TYPE(args[i])->tp_name));
  }
  PyObject* const* items(Py_ssize_t i, const char* name, Py_ssize_t& size) const {
    PyObject* obj = args[i];
    if (PyList_Check(obj)) {
      size = PyList_GET_SIZE(obj);
      return &PyList_GET_ITEM(obj, 0);
    }
    if (PyTuple_Check(obj)) {
      size = PyTuple_GET_SIZE(obj);
      return &PyTuple_GET_ITEM(obj, 0);
    }
    wrong(i, name, "a list");
  }
  std::vector<at::Tensor> tensors(Py_ssize_t i, const char* name) const {
    Py_ssize_t size = 0;
    PyObject* const* item = items(i, name, size);
    std::vector<at::Tensor> out;
    out.reserve(size);
    for (Py_ssize_t k = 0; k < size; ++k) {
      if (!THPVariable_Check(item[k])) wrong(i, name, "a list of tensors");
      out.push_back(THPVariable_Unpack(item[k]));
    }
    return out;
  }
  std::vector<double> numbers(Py_ssize_t i, const char* name) const {
    Py_ssize_t size = 0;
    PyObject* const* item = items(i, name, size);
    std::vector<double> out(size);
    for (Py_ssize_t k = 0; k < size; ++k) {
      if (!as_double(item[k], out[k])) wrong(i, name, "a list of numbers");
    }
    return out;
  }
  std::vector<int64_t> integers(Py_ssize_t i, const char* name) const {
    Py_ssize_t size = 0;
    PyObject* const* item = items(i, name, size);
    std::vector<int64_t> out(size);
    for (Py_ssize_t k = 0; k < size; ++k) {
      if (!PyLong_Check(item[k]) || PyBool_Check(item[k])) wrong(i, name, "a list of ints");
      out[k] = PyLong_AsLongLong(item[k]);
    }
    return out;
  }
  const at::Tensor& tensor(Py_ssize_t i, const char* name) const {
    if (!THPVariable_Check(args[i])) wrong(i, name, "a tensor");
    return THPVariable_Unpack(args[i]);
  }
  int64_t integer(Py_ssize_t i, const char* name) const {
    if (!PyLong_Check(args[i]) || PyBool_Check(args[i])) wrong(i, name, "an int");
    return PyLong_AsLongLong(args[i]);
  }
  double real(Py_ssize_t i, const char* name) const {
    double value = 0;
    if (!as_double(args[i], value)) wrong(i, name, "a number");
    return value;
  }
  // obj as a double (a float, an int or anything with __float__); false, the error cleared, for anything else
  static bool as_double(PyObject* obj, double& value) {
    value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  bool boolean(Py_ssize_t i, const char* name) const {
    if (!PyBool_Check(args[i])) wrong(i, name, "a bool");
    return args[i] == Py_True;
  }
  c10::string_view string(Py_ssize_t i, const char* name) const {
    Py_ssize_t size = 0;
    const char* text = PyUnicode_Check(args[i]) ? PyUnicode_AsUTF8AndSize(args[i], &size) : nullptr;
    if (text == nullptr) wrong(i, name, "a str");
    return c10::string_view(text, size);
  }
};

// The GIL released for the length of a call (the op's worker threads do not need it).
struct WithoutGil {
  PyThreadState* state = PyEval_SaveThread();
  ~WithoutGil() { PyEval_RestoreThread(state); }
};

// maml_mlp_meta_step_ and maml_mlp_meta_steps_ called straight from Python (MAML.meta_step's and meta_steps' fused
// path): the boxing of the sinusoid's 31 tensors by torch.ops cost about a tenth of its whole meta-step.
template <const char* kName>
PyObject* maml_mlp_meta_step_unboxed(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 17) {
    throw torch::TypeError(c10::str(kName, ": expected 17 arguments, got ", nargs));
  }
  const Arguments a{kName, args};
  const std::vector<at::Tensor> params = a.tensors(0, "params"), lr = a.tensors(1, "lr");
  const std::vector<at::Tensor> grads = a.tensors(2, "grads"), state = a.tensors(3, "state");
  const std::vector<double> settings = a.numbers(14, "settings"), step_weights = a.numbers(16, "step_weights");
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(c10::str("metalearn_fast::", kName).c_str(), "")
          .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool, c10::string_view,
                            int64_t, bool, c10::string_view, c10::ArrayRef<double>, bool, c10::ArrayRef<double>)>();
  const at::Tensor &x_support = a.tensor(4, "x_support"), &y_support = a.tensor(5, "y_support");
  const at::Tensor &x_query = a.tensor(6, "x_query"), &y_query = a.tensor(7, "y_query");
  const int64_t inner_steps = a.integer(8, "inner_steps"), first_adapted = a.integer(11, "first_adapted_layer");
  const bool first_order = a.boolean(9, "first_order"), learn_lr = a.boolean(12, "learn_lr");
  const bool per_step_lr = a.boolean(15, "per_step_lr");
  const c10::string_view loss = a.string(10, "loss"), optimizer = a.string(13, "optimizer");
  at::Tensor value;
  {
    WithoutGil released;
    value = op.call(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                    first_adapted, learn_lr, optimizer, settings, per_step_lr, step_weights);
  }
  return THPVariable_Wrap(std::move(value));
  END_HANDLE_TH_ERRORS
}
constexpr char kMetaStep[] = "maml_mlp_meta_step_";
constexpr char kMetaSteps[] = "maml_mlp_meta_steps_";

// A tuple of the tensors (None for an undefined one).
PyObject* tuple_of(std::vector<at::Tensor>&& out) {
  PyObject* tuple = PyTuple_New(out.size());
  for (size_t i = 0; i < out.size(); ++i) PyTuple_SET_ITEM(tuple, i, THPVariable_Wrap(std::move(out[i])));
  return tuple;
}

// norm_relu, norm_relu_backward, norm_relu_tangent and norm_relu_tangent_backward -> tuple of tensors: the CPU
// kernels of convnet.py's BatchNorm + ReLU (cpu/norm_relu_cpu.h), called with the GIL released.
template <size_t N, typename Kernel>
PyObject* tensors_in_tuple_out(const char* name, const std::array<const char*, N>& names, PyObject* const* args,
                               Py_ssize_t nargs, const Kernel& kernel) {
  if (nargs != static_cast<Py_ssize_t>(N)) {
    throw torch::TypeError(c10::str(name, ": expected ", N, " tensors, got ", nargs, " arguments"));
  }
  const Arguments a{name, args};
  std::array<at::Tensor, N> in;
  for (size_t i = 0; i < N; ++i) in[i] = a.tensor(i, names[i]);
  std::vector<at::Tensor> out;
  {
    WithoutGil released;
    out = kernel(in);
  }
  return tuple_of(std::move(out));
}

PyObject* norm_relu_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "norm_relu";
  if (nargs != 4) throw torch::TypeError(c10::str(name, ": expected 4 arguments (z, gamma, beta, eps), got ", nargs));
  const Arguments a{name, args};
  const double eps = a.real(3, "eps");
  static const std::array<const char*, 3> names{"z", "gamma", "beta"};
  return tensors_in_tuple_out<3>(name, names, args, 3, [eps](const auto& t) {
    return metalearn_fast::norm_relu(t[0], t[1], t[2], eps);
  });
  END_HANDLE_TH_ERRORS
}

PyObject* norm_relu_backward_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "norm_relu_backward";
  if (nargs != 6) throw torch::TypeError(c10::str(name, ": expected 6 arguments (5 tensors, with_g_y), got ", nargs));
  const bool with_g_y = Arguments{name, args}.boolean(5, "with_g_y");
  static const std::array<const char*, 5> names{"g_a", "a", "xhat", "invstd", "gamma"};
  return tensors_in_tuple_out<5>(name, names, args, 5, [with_g_y](const auto& t) {
    return metalearn_fast::norm_relu_backward(t[0], t[1], t[2], t[3], t[4], with_g_y);
  });
  END_HANDLE_TH_ERRORS
}

PyObject* norm_relu_tangent_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const std::array<const char*, 7> names{"dz", "xhat", "a", "invstd", "gamma", "d_gamma", "d_beta"};
  return tensors_in_tuple_out<7>("norm_relu_tangent", names, args, nargs, [](const auto& t) {
    return metalearn_fast::norm_relu_tangent(t[0], t[1], t[2], t[3], t[4], t[5], t[6]);
  });
  END_HANDLE_TH_ERRORS
}

PyObject* norm_relu_tangent_backward_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "norm_relu_tangent_backward";
  if (nargs != 12) {
    throw torch::TypeError(c10::str(name, ": expected 12 arguments (11 tensors, with_g_z), got ", nargs));
  }
  const bool with_g_z = Arguments{name, args}.boolean(11, "with_g_z");
  static const std::array<const char*, 11> names{"dg_a",  "a",       "xhat",    "d_xhat",  "g_y",    "invstd",
                                                 "gamma", "d_gamma", "d_scale", "g_gamma", "g_beta"};
  return tensors_in_tuple_out<11>(name, names, args, 11, [with_g_z](const auto& t) {
    return metalearn_fast::norm_relu_tangent_backward(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9],
                                                      t[10], with_g_z);
  });
  END_HANDLE_TH_ERRORS
}

// grouped_conv(x, weight, bias or None, stride, padding, groups) -> out and grouped_conv_backward(g, x, weight,
// stride, padding, groups, need_input, need_weight, need_bias) -> (g_x, g_w, g_b, each None unless asked for):
// convnet.py's direct convolutions of small maps (cpu/grouped_conv_cpu.h), called with the GIL released.
PyObject* grouped_conv_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "grouped_conv";
  if (nargs != 6) {
    throw torch::TypeError(c10::str(name, ": expected 6 arguments (x, weight, bias, stride, padding, groups), got ",
                                    nargs));
  }
  const Arguments a{name, args};
  const at::Tensor &x = a.tensor(0, "x"), &weight = a.tensor(1, "weight");
  const at::Tensor bias = args[2] == Py_None ? at::Tensor() : a.tensor(2, "bias");
  const std::vector<int64_t> stride = a.integers(3, "stride"), padding = a.integers(4, "padding");
  const int64_t groups = a.integer(5, "groups");
  at::Tensor out;
  {
    WithoutGil released;
    out = metalearn_fast::grouped_conv(x, weight, bias, stride, padding, groups);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* grouped_conv_backward_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "grouped_conv_backward";
  if (nargs != 9) {
    throw torch::TypeError(c10::str(name, ": expected 9 arguments (g, x, weight, stride, padding, groups, need_input, "
                                    "need_weight, need_bias), got ", nargs));
  }
  const Arguments a{name, args};
  const at::Tensor &g = a.tensor(0, "g"), &x = a.tensor(1, "x"), &weight = a.tensor(2, "weight");
  const std::vector<int64_t> stride = a.integers(3, "stride"), padding = a.integers(4, "padding");
  const int64_t groups = a.integer(5, "groups");
  const bool need_input = a.boolean(6, "need_input"), need_weight = a.boolean(7, "need_weight");
  const bool need_bias = a.boolean(8, "need_bias");
  std::vector<at::Tensor> out;
  {
    WithoutGil released;
    out = metalearn_fast::grouped_conv_backward(g, x, weight, stride, padding, groups, need_input, need_weight,
                                                need_bias);
  }
  return tuple_of(std::move(out));
  END_HANDLE_TH_ERRORS
}

// cpu_simd() -> str and set_cpu_simd(level: str) -> str (the level before): which hand-written CPU kernels
// run ("none", "avx2", "avx512"; cpu/small_kernels.h), for backend_info and for tests that force each path.
PyObject* cpu_simd_get(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyUnicode_FromString(metalearn_fast::cpu_simd_name(metalearn_fast::cpu_simd()));
}

PyObject* cpu_simd_set(PyObject* /*module*/, PyObject* level) {
  HANDLE_TH_ERRORS
  const char* name = PyUnicode_Check(level) ? PyUnicode_AsUTF8(level) : nullptr;
  metalearn_fast::CpuSimd wanted = metalearn_fast::CpuSimd::kNone;
  TORCH_CHECK_VALUE(name != nullptr && metalearn_fast::cpu_simd_from_name(name, &wanted),
                    "set_cpu_simd: level must be 'none', 'avx2' or 'avx512'");
  return PyUnicode_FromString(metalearn_fast::cpu_simd_name(metalearn_fast::set_cpu_simd(wanted)));
  END_HANDLE_TH_ERRORS
}

PyObject* block_cache_enter_entry(PyObject* /*module*/, PyObject* /*unused*/) {
  metalearn_fast::block_cache_enter();
  Py_RETURN_NONE;
}

PyObject* block_cache_exit_entry(PyObject* /*module*/, PyObject* /*unused*/) {
  metalearn_fast::block_cache_exit();
  Py_RETURN_NONE;
}

PyObject* block_cache_release_entry(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(metalearn_fast::block_cache_release());
}

PyObject* block_cache_stats_entry(PyObject* /*module*/, PyObject* /*unused*/) {
  const metalearn_fast::BlockCacheStats stats = metalearn_fast::block_cache_stats();
  return Py_BuildValue("(LLO)", static_cast<long long>(stats.cached_bytes),
                       static_cast<long long>(stats.system_blocks), stats.active ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"cpu_simd", cpu_simd_get, METH_NOARGS, "cpu_simd() -> str: which hand-written CPU kernels run"},
    {"set_cpu_simd", cpu_simd_set, METH_O,
     "set_cpu_simd(level) -> str: run the hand-written CPU kernels of 'none', 'avx2' or 'avx512' (at most the "
     "CPU's); returns the level before"},
    {"linear_relu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(linear_relu_unboxed)), METH_FASTCALL,
     "linear_relu(x, weight, bias): the op without torch.ops' boxing (eager calls)"},
    {"maml_mlp_meta_step_",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(maml_mlp_meta_step_unboxed<kMetaStep>)),
     METH_FASTCALL, "maml_mlp_meta_step_(...): the op without torch.ops' boxing (eager calls), all 17 arguments"},
    {"maml_mlp_meta_steps_",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(maml_mlp_meta_step_unboxed<kMetaSteps>)),
     METH_FASTCALL, "maml_mlp_meta_steps_(...): the op without torch.ops' boxing (eager calls), all 17 arguments"},
    {"norm_relu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(norm_relu_entry)), METH_FASTCALL,
     "norm_relu(z, gamma, beta, eps) -> (xhat, a, invstd)"},
    {"norm_relu_backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(norm_relu_backward_entry)),
     METH_FASTCALL, "norm_relu_backward(g_a, a, xhat, invstd, gamma, with_g_y) -> (g_y or None, g_z, g_gamma, g_beta); "
     "g_z is written over g_a where g_a is channels-last"},
    {"norm_relu_tangent", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(norm_relu_tangent_entry)),
     METH_FASTCALL, "norm_relu_tangent(dz, xhat, a, invstd, gamma, d_gamma, d_beta) -> (d_xhat, d_a, d_scale)"},
    {"norm_relu_tangent_backward",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(norm_relu_tangent_backward_entry)), METH_FASTCALL,
     "norm_relu_tangent_backward(dg_a, a, xhat, d_xhat, g_y, invstd, gamma, d_gamma, d_scale, g_gamma, g_beta, "
     "with_g_z) -> (dg_z, g_z or None, dg_gamma, dg_beta)"},
    {"grouped_conv", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grouped_conv_entry)), METH_FASTCALL,
     "grouped_conv(x, weight, bias or None, stride, padding, groups) -> out: F.conv2d's grouped convolution, direct, "
     "channels-last (input channels per group a multiple of the register's lanes, or output channels)"},
    {"grouped_conv_backward", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grouped_conv_backward_entry)),
     METH_FASTCALL,
     "grouped_conv_backward(g, x, weight, stride, padding, groups, need_input, need_weight, need_bias) -> (g_x, g_w, "
     "g_b), each None unless asked for (g_x: input channels per group a multiple of the register's lanes)"},
    {"block_cache_enter", block_cache_enter_entry, METH_NOARGS,
     "block_cache_enter(): large CPU blocks from the block cache until the matching block_cache_exit (nests)"},
    {"block_cache_exit", block_cache_exit_entry, METH_NOARGS, "block_cache_exit(): see block_cache_enter"},
    {"block_cache_release", block_cache_release_entry, METH_NOARGS,
     "block_cache_release() -> int: frees the cached blocks no tensor holds; the bytes freed"},
    {"block_cache_stats", block_cache_stats_entry, METH_NOARGS,
     "block_cache_stats() -> (cached bytes, blocks ever taken from the system, whether the cache is torch's CPU "
     "allocator now)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The module carries what was built and the unboxed entry points; the ops register themselves
// when it is loaded.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "metalearn_fast compiled kernels", -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  PyModule_AddIntConstant(module, "WITH_CUDA", METALEARN_FAST_WITH_CUDA);
  PyModule_AddStringConstant(module, "CUDA_ARCH_LIST", METALEARN_FAST_CUDA_ARCH_LIST);
  PyModule_AddStringConstant(module, "TORCH_VERSION", METALEARN_FAST_TORCH_VERSION);
  PyModule_AddStringConstant(module, "CUDA_VERSION", METALEARN_FAST_CUDA_VERSION);
  PyModule_AddStringConstant(module, "NO_CUDA_REASON", METALEARN_FAST_NO_CUDA_REASON);
  PyModule_AddIntConstant(module, "CPU_TASK_KERNEL", metalearn_fast::cpu_has_avx2_fma());
  PyModule_AddStringConstant(module, "CPU_SIMD_AVAILABLE",
                             metalearn_fast::cpu_simd_name(metalearn_fast::cpu_simd_available()));
  PyModule_AddIntConstant(module, "CPU_TASK_KERNEL_MAX_LAYER", metalearn_fast::kMaxSmallLayer);
  return module;
}
