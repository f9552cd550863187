// Autograd for maml_mlp_loss: the MAML meta-loss of an MLP as one autograd node, in C++.
//
// Its forward runs maml_mlp_meta_grad, which returns the loss together with the gradients the
// inputs need (params, lr, or both), and its backward only scales them by the incoming gradient.
// A meta-step thus costs one op call and one node in the engine, with no Python in between. The
// inner loop lives inside the op, so the node is differentiable once.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "composite/maml_mlp.h"

namespace metalearn_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool any_requires_grad(at::TensorList tensors) {
  for (const auto& t : tensors) {
    if (t.requires_grad()) return true;
  }
  return false;
}

class MamlMlpLoss : public torch::autograd::Function<MamlMlpLoss> {
 public:
  static Tensor forward(AutogradContext* ctx, at::TensorList params, at::TensorList lr, const Tensor& x_support,
                        const Tensor& y_support, const Tensor& x_query, const Tensor& y_query, int64_t inner_steps,
                        bool first_order, c10::string_view loss, int64_t first_adapted, bool per_step_lr,
                        c10::ArrayRef<double> step_weights) {
    const bool compute_grad = any_requires_grad(params);
    const bool compute_lr_grad = any_requires_grad(lr);
    MetaGrad result;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      result = call_maml_mlp_meta_grad(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order,
                                       loss, first_adapted, compute_grad, compute_lr_grad, per_step_lr, step_weights);
    }
    auto& [value, grads, lr_grads] = result;
    grads.insert(grads.end(), lr_grads.begin(), lr_grads.end());
    ctx->save_for_backward(grads);
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    ctx->saved_data["lr"] = static_cast<int64_t>(lr.size());
    ctx->saved_data["has"] = c10::List<bool>({compute_grad, compute_lr_grad});
    return value;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "maml_mlp_loss is differentiable once: its gradient cannot be differentiated again "
                "(backward with create_graph=True)");
    const int64_t param_count = ctx->saved_data["params"].toInt();
    const int64_t lr_count = ctx->saved_data["lr"].toInt();
    const auto has = ctx->saved_data["has"].toBoolList();
    // one call scales every gradient
    std::vector<Tensor> scaled = at::_foreach_mul(ctx->get_saved_variables(), grad_outputs[0]);
    // one entry per input: params, lr, the four data tensors and the six options (undefined)
    variable_list result(param_count + lr_count + 10);
    auto next = scaled.begin();
    if (has[0]) {
      std::move(next, next + param_count, result.begin());
      next += param_count;
    }
    if (has[1]) std::move(next, next + lr_count, result.begin() + param_count);
    return result;
  }
};

Tensor maml_mlp_loss_autograd(at::TensorList params, at::TensorList lr, const Tensor& x_support,
                              const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                              int64_t inner_steps, bool first_order, c10::string_view loss, int64_t first_adapted,
                              bool per_step_lr, c10::ArrayRef<double> step_weights) {
  const char* names[] = {"x_support", "y_support", "x_query", "y_query"};
  const Tensor* data[] = {&x_support, &y_support, &x_query, &y_query};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && data[i]->requires_grad()), "maml_mlp_loss: ", names[i],
                      " requires grad, but the op differentiates w.r.t. params and lr only; detach it");
  }
  if (!at::GradMode::is_enabled() || !(any_requires_grad(params) || any_requires_grad(lr))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("metalearn_fast::maml_mlp_loss", "")
                         .typed<Tensor(at::TensorList, at::TensorList, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, int64_t, bool, c10::string_view, int64_t, bool,
                                       c10::ArrayRef<double>)>();
    return op.call(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss, first_adapted,
                   per_step_lr, step_weights);
  }
  return MamlMlpLoss::apply(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                            first_adapted, per_step_lr, step_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, Autograd, m) { m.impl("maml_mlp_loss", &maml_mlp_loss_autograd); }

}  // namespace metalearn_fast
