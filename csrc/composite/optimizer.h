// The update of torch.optim's Adam (AdamW: decoupled weight decay) and SGD, applied by the fused ops
// to the parameters and to the optimizer's own state tensors, with torch's formulas
// (torch/optim/adam.py and sgd.py, their single-tensor form), so that the Python optimizer can take
// over at any step with the same numbers.
//
// An op that updates parameters takes the optimizer as three arguments:
//   str optimizer      "adam" or "sgd"
//   float[] settings   kSettingsPerParam numbers per updated tensor, from its param group:
//                        adam: lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize
//                        sgd:  lr, momentum, dampening, weight_decay, nesterov, maximize, has_buffer
//                      (flags as 0/1; has_buffer: the momentum buffer holds a history, else the first
//                      step copies the gradient into it, as torch does when the buffer is None)
//   Tensor(a!)[] state the optimizer's state tensors, per updated tensor in order:
//                        adam: step (0-dim, float32 or float64), exp_avg, exp_avg_sq
//                        sgd:  momentum_buffer when momentum != 0, nothing otherwise
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace metalearn_fast {

enum class OptimizerKind { kAdam, kSgd };

constexpr int64_t kSettingsPerParam = 7;

// One updated tensor's settings: its param group's hyperparameters and where its state is.
struct ParamUpdate {
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0, momentum = 0, dampening = 0;
  bool decoupled_weight_decay = false, nesterov = false, maximize = false, has_buffer = false;
  int64_t state = 0;  // index of its first state tensor
};

struct OptimizerUpdate {
  OptimizerKind kind;
  std::vector<ParamUpdate> params;

  // how many state tensors the i-th updated tensor has
  int64_t state_count(size_t i) const;
  // after a step: every momentum buffer holds a history (has_buffer)
  void momentum_buffers_filled() {
    for (auto& u : params) u.has_buffer = true;
  }
};

// The optimizer arguments of `op`, checked against the tensors it updates (one gradient and one set of
// state tensors per tensor, matching shapes, dtypes and devices); raises naming the argument.
OptimizerUpdate parse_optimizer(const char* op, c10::string_view optimizer, c10::ArrayRef<double> settings,
                                at::TensorList params, at::TensorList grads, at::TensorList state);

// The same for an op's settings list: SGD's has_buffer = 1 after a step.
void momentum_buffers_filled(c10::string_view optimizer, std::vector<double>& settings);
// torch's bias corrections of Adam at (already incremented) step `step`: (lr / bc1, sqrt(bc2)), in double as
// Python computes them.
std::pair<double, double> adam_step_size(const ParamUpdate& u, double step);

// Adds one to an Adam step tensor (0-dim, on the CPU) and returns the new count.
double increment_step(const at::Tensor& step);

// The update of params[i] by grads[i] in ATen ops (any device), the same ops torch.optim runs.
void optimizer_update_aten(const OptimizerUpdate& update, at::TensorList params, at::TensorList grads,
                           at::TensorList state);

// optimizer_step_ through the dispatcher: the device's kernel (the CPU's runs raw loops).
void call_optimizer_step(at::TensorList params, at::TensorList grads, at::TensorList state,
                         c10::string_view optimizer, c10::ArrayRef<double> settings);

}  // namespace metalearn_fast
