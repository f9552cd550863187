// optimizer_step_ in ATen ops (any device; the CPU has raw loops in cpu/optimizer_cpu.cpp), and the
// parsing of the optimizer arguments every fused op shares. See optimizer.h for the arguments.
#include "composite/optimizer.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace metalearn_fast {

int64_t OptimizerUpdate::state_count(size_t i) const {
  if (kind == OptimizerKind::kAdam) return 3;
  return params[i].momentum != 0 ? 1 : 0;
}

OptimizerUpdate parse_optimizer(const char* op, c10::string_view optimizer, c10::ArrayRef<double> settings,
                                at::TensorList params, at::TensorList grads, at::TensorList state) {
  OptimizerUpdate update;
  if (optimizer == "adam") {
    update.kind = OptimizerKind::kAdam;
  } else if (optimizer == "sgd") {
    update.kind = OptimizerKind::kSgd;
  } else {
    TORCH_CHECK_VALUE(false, op, ": optimizer must be 'adam' or 'sgd', got '", optimizer, "'");
  }
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n, op, ": grads must hold one tensor per updated tensor (",
                    n, "), got ", grads.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(settings.size()) == n * kSettingsPerParam, op, ": settings must hold ",
                    kSettingsPerParam, " numbers per updated tensor (", n * kSettingsPerParam, "), got ",
                    settings.size());
  int64_t next_state = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double* s = settings.data() + i * kSettingsPerParam;
    ParamUpdate u;
    u.lr = s[0];
    if (update.kind == OptimizerKind::kAdam) {
      u.beta1 = s[1], u.beta2 = s[2], u.eps = s[3], u.weight_decay = s[4];
      u.decoupled_weight_decay = s[5] != 0, u.maximize = s[6] != 0;
    } else {
      u.momentum = s[1], u.dampening = s[2], u.weight_decay = s[3];
      u.nesterov = s[4] != 0, u.maximize = s[5] != 0, u.has_buffer = s[6] != 0;
    }
    u.state = next_state;
    update.params.push_back(u);
    next_state += update.state_count(i);

    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), op, ": updated tensor ", i,
                     " must be floating point, got ", p.scalar_type());
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i, "] must have dtype ", p.scalar_type(),
                     ", got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.device() == p.device() && g.sizes() == p.sizes(), op, ": grads[", i,
                      "] must match its tensor's shape ", p.sizes(), " and device ", p.device(), ", got ", g.sizes(),
                      " on ", g.device());
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(state.size()) == next_state, op, ": state must hold ", next_state,
                    " tensors for these settings, got ", state.size());
  for (int64_t i = 0; i < n; ++i) {
    const ParamUpdate& u = update.params[i];
    const at::Tensor& p = params[i];
    const int64_t count = update.state_count(i);
    for (int64_t k = 0; k < count; ++k) {
      const at::Tensor& t = state[u.state + k];
      if (update.kind == OptimizerKind::kAdam && k == 0) {  // the step count
        TORCH_CHECK_VALUE(t.dim() == 0 && t.is_cpu() && at::isFloatingType(t.scalar_type()), op, ": state[",
                          u.state, "] must be the 0-dim floating-point step tensor on the CPU, got shape ", t.sizes(),
                          " on ", t.device());
        continue;
      }
      TORCH_CHECK_VALUE(t.scalar_type() == p.scalar_type() && t.device() == p.device() && t.sizes() == p.sizes(),
                        op, ": state[", u.state + k, "] must match its tensor (", p.sizes(), ", ", p.scalar_type(),
                        ", ", p.device(), "), got ", t.sizes(), ", ", t.scalar_type(), ", ", t.device());
    }
  }
  return update;
}

void momentum_buffers_filled(c10::string_view optimizer, std::vector<double>& settings) {
  if (optimizer != "sgd") return;
  for (size_t i = kSettingsPerParam - 1; i < settings.size(); i += kSettingsPerParam) settings[i] = 1;
}

std::pair<double, double> adam_step_size(const ParamUpdate& u, double step) {
  const double bias_correction1 = 1 - std::pow(u.beta1, step);
  const double bias_correction2 = 1 - std::pow(u.beta2, step);
  return {u.lr / bias_correction1, std::pow(bias_correction2, 0.5)};
}

double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) return ++*step.mutable_data_ptr<double>();
  TORCH_CHECK(step.scalar_type() == at::kFloat, "optimizer: the step tensor must be float32 or float64");
  return ++*step.mutable_data_ptr<float>();
}

void optimizer_update_aten(const OptimizerUpdate& update, at::TensorList params, at::TensorList grads,
                           at::TensorList state) {
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamUpdate& u = update.params[i];
    at::Tensor param = params[i];
    at::Tensor grad = u.maximize ? grads[i].neg() : grads[i];
    if (update.kind == OptimizerKind::kAdam) {
      const double step = increment_step(state[u.state]);
      at::Tensor exp_avg = state[u.state + 1], exp_avg_sq = state[u.state + 2];
      if (u.weight_decay != 0) {
        if (u.decoupled_weight_decay) {
          param.mul_(1 - u.lr * u.weight_decay);
        } else {
          grad = grad.add(param, u.weight_decay);
        }
      }
      exp_avg.lerp_(grad, 1 - u.beta1);
      exp_avg_sq.mul_(u.beta2).addcmul_(grad, grad, 1 - u.beta2);
      const auto [step_size, bias_correction2_sqrt] = adam_step_size(u, step);
      at::Tensor denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(u.eps);
      param.addcdiv_(exp_avg, denom, -step_size);
      continue;
    }
    if (u.weight_decay != 0) grad = grad.add(param, u.weight_decay);
    if (u.momentum != 0) {
      at::Tensor buffer = state[u.state];
      if (u.has_buffer) {
        buffer.mul_(u.momentum).add_(grad, 1 - u.dampening);
      } else {
        buffer.copy_(grad);
      }
      grad = u.nesterov ? grad.add(buffer, u.momentum) : buffer;
    }
    param.add_(grad, -u.lr);
  }
}

void call_optimizer_step(at::TensorList params, at::TensorList grads, at::TensorList state,
                         c10::string_view optimizer, c10::ArrayRef<double> settings) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::optimizer_step_", "")
                       .typed<void(at::TensorList, at::TensorList, at::TensorList, c10::string_view,
                                   c10::ArrayRef<double>)>();
  op.call(params, grads, state, optimizer, settings);
}

namespace {

void optimizer_step_composite(at::TensorList params, at::TensorList grads, at::TensorList state,
                              c10::string_view optimizer, c10::ArrayRef<double> settings) {
  const OptimizerUpdate update = parse_optimizer("optimizer_step_", optimizer, settings, params, grads, state);
  optimizer_update_aten(update, params, grads, state);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CompositeExplicitAutograd, m) {
  m.impl("optimizer_step_", &optimizer_step_composite);
}

}  // namespace metalearn_fast
