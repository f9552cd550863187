// Autograd for mlp_loss_grad: an MLP's loss gradient as one autograd node.
//
// learn2learn-style MAML code adapts a clone with autograd.grad(loss, params, create_graph=True): the
// gradient of a small MLP then costs a graph of some thirty small ops per inner step, which the meta-loss's
// backward walks again. Here the gradient is one op and one node, and its backward is the analytic
// Hessian-vector product of the loss (composite/maml_mlp.cpp), in ATen ops: recorded when the backward
// itself is differentiated, so the node is differentiable to any order.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "composite/maml_mlp.h"

namespace metalearn_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::vector<Tensor> call_mlp_loss_grad(at::TensorList params, const Tensor& x, const Tensor& y,
                                       c10::string_view loss) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::mlp_loss_grad", "")
                       .typed<std::vector<Tensor>(at::TensorList, const Tensor&, const Tensor&, c10::string_view)>();
  return op.call(params, x, y, loss);
}

class MlpLossGrad : public torch::autograd::Function<MlpLossGrad> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList params, const Tensor& x, const Tensor& y,
                               c10::string_view loss) {
    TORCH_CHECK_VALUE(!x.requires_grad() && !y.requires_grad(), "mlp_loss_grad: x and y must not require grad ",
                      "(the op differentiates w.r.t. params only); detach them");
    std::vector<Tensor> grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = call_mlp_loss_grad(params, x, y, loss);
    }
    std::vector<Tensor> saved(params.begin(), params.end());
    saved.push_back(x);
    saved.push_back(y);
    ctx->save_for_backward(saved);
    ctx->saved_data["loss"] = std::string(loss);
    return grads;
  }

  // d params = H v: the Hessian of the loss applied to the incoming gradients (H is symmetric)
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const size_t count = saved.size() - 2;
    const std::vector<Tensor> params(saved.begin(), saved.begin() + count);
    const LossKind kind = maml_loss_kind(ctx->saved_data["loss"].toStringRef(), "mlp_loss_grad");
    const Tensor& x = saved[count];
    const Tensor& y = saved[count + 1];
    variable_list result;
    if (at::GradMode::is_enabled()) {  // the product is differentiated in turn: in ATen ops autograd records
      result = mlp_loss_hessian_times(params, x, y, kind, grad_outputs);
    } else {  // the device's kernel (the CPU's small-MLP loops), one op to anything that traces it
      c10::List<std::optional<Tensor>> direction;
      for (const auto& t : grad_outputs) direction.push_back(t.defined() ? std::optional<Tensor>(t) : std::nullopt);
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("metalearn_fast::mlp_loss_hessian_times", "")
                           .typed<std::vector<Tensor>(at::TensorList, const Tensor&, const Tensor&, c10::string_view,
                                                      const c10::List<std::optional<Tensor>>&)>();
      result = op.call(params, x, y, ctx->saved_data["loss"].toStringRef(), direction);
    }
    result.resize(count + 3);  // x, y and loss get no gradient
    return result;
  }
};

std::vector<Tensor> mlp_loss_grad_autograd(at::TensorList params, const Tensor& x, const Tensor& y,
                                           c10::string_view loss) {
  return MlpLossGrad::apply(params, x, y, loss);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, Autograd, m) { m.impl("mlp_loss_grad", &mlp_loss_grad_autograd); }

}  // namespace metalearn_fast
