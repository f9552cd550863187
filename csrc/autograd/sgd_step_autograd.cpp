// Autograd for sgd_step: new = p - lr * g, differentiable in params, grads and lr (second-order MAML
// and learned inner rates), written with ATen ops so that its backward is itself differentiable.
// sgd_step_ updates in place and refuses to run where autograd would have to see the update.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <vector>

namespace metalearn_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<at::Tensor> call_sgd_step(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::sgd_step", "")
                       .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList)>();
  return op.call(params, grads, lr);
}

class SgdStepFunction : public torch::autograd::Function<SgdStepFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, at::TensorList grads,
                               at::TensorList lr) {
    std::vector<at::Tensor> out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = call_sgd_step(params, grads, lr);
    }
    std::vector<at::Tensor> saved(grads.begin(), grads.end());
    saved.insert(saved.end(), lr.begin(), lr.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["count"] = static_cast<int64_t>(params.size());
    return out;
  }

  // d params = go, d grads = -lr * go, d lr = -sum(go * g) reduced to lr's shape (and over params when shared).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const int64_t n = ctx->saved_data["count"].toInt();
    const auto saved = ctx->get_saved_variables();
    const int64_t lr_count = static_cast<int64_t>(saved.size()) - n;
    variable_list result(2 * n + lr_count);
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& go = grad_outputs[i];
      if (!go.defined()) continue;
      const at::Tensor& g = saved[i];
      const at::Tensor& lr = saved[n + (lr_count == 1 ? 0 : i)];
      if (ctx->needs_input_grad(i)) result[i] = go;
      if (ctx->needs_input_grad(n + i)) result[n + i] = -(lr * go);
      const int64_t lr_slot = 2 * n + (lr_count == 1 ? 0 : i);
      if (ctx->needs_input_grad(lr_slot)) {
        at::Tensor d_lr = -(go * g).sum_to_size(lr.sizes());
        result[lr_slot] = result[lr_slot].defined() ? result[lr_slot] + d_lr : d_lr;
      }
    }
    return result;
  }
};

std::vector<at::Tensor> sgd_step_autograd(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  return SgdStepFunction::apply(params, grads, lr);
}

void sgd_step_inplace_autograd(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  if (at::GradMode::is_enabled()) {
    for (size_t i = 0; i < params.size(); ++i) {
      TORCH_CHECK_VALUE(!params[i].requires_grad(), "sgd_step_: params[", i,
                        "] requires grad; update it in place under torch.no_grad(), or use sgd_step");
    }
    for (const auto& t : grads) TORCH_CHECK_VALUE(!t.requires_grad(), "sgd_step_: grads must not require grad");
    for (const auto& t : lr) TORCH_CHECK_VALUE(!t.requires_grad(), "sgd_step_: lr must not require grad");
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metalearn_fast::sgd_step_", "")
                         .typed<void(at::TensorList, at::TensorList, at::TensorList)>();
    op.call(params, grads, lr);
  }
  for (const auto& p : params) torch::autograd::increment_version(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, Autograd, m) {
  m.impl("sgd_step", &sgd_step_autograd);
  m.impl("sgd_step_", &sgd_step_inplace_autograd);
}

}  // namespace metalearn_fast
