// maml_mlp_meta_step_: a whole MAML meta-step of an MLP in one call. The meta-loss and meta-gradient
// come from the device's maml_mlp_meta_grad kernel, the gradients are written into the .grad tensors,
// and the optimizer update (composite/optimizer.h) is applied to the parameters (and to the learned
// Meta-SGD rates) and to the optimizer's state. maml_mlp_meta_steps_: that meta-step for each of a stack
// of meta-batches in turn, in one call (a training loop's meta-steps without a return to Python between
// them). Device-neutral: both halves dispatch to the device's kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "checks.h"
#include "composite/maml_mlp.h"
#include "composite/optimizer.h"

namespace metalearn_fast {
namespace {

// dst.copy_(src); a plain memcpy for contiguous CPU tensors of one dtype (copy_'s TensorIterator costs more than
// copying a small MLP's gradient).
void copy_into(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.is_cpu() && src.is_cpu() && dst.scalar_type() == src.scalar_type() && dst.sizes() == src.sizes() &&
      dst.is_contiguous() && src.is_contiguous() && !dst.is_conj() && !src.is_conj() && !src.is_neg()) {
    std::memcpy(dst.mutable_data_ptr(), src.const_data_ptr(), src.nbytes());
    dst.unsafeGetTensorImpl()->bump_version();  // as copy_ does
    return;
  }
  dst.copy_(src);
}

// One meta-step on the meta-batch (x_support, y_support, x_query, y_query): the meta-gradient into grads and the
// optimizer's update of `updated`. Returns the meta-loss.
at::Tensor meta_step_on(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                        at::TensorList updated, const at::Tensor& x_support, const at::Tensor& y_support,
                        const at::Tensor& x_query, const at::Tensor& y_query, int64_t inner_steps, bool first_order,
                        c10::string_view loss, int64_t first_adapted, bool learn_lr, c10::string_view optimizer,
                        c10::ArrayRef<double> settings, bool per_step_lr, c10::ArrayRef<double> step_weights) {
  auto [value, param_grads, lr_grads] = call_maml_mlp_meta_grad(
      params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss, first_adapted, true, learn_lr,
      per_step_lr, step_weights);
  param_grads.insert(param_grads.end(), lr_grads.begin(), lr_grads.end());
  for (size_t i = 0; i < updated.size(); ++i) copy_into(grads[i], param_grads[i]);
  call_optimizer_step(updated, grads, state, optimizer, settings);
  return value;
}

at::Tensor maml_mlp_meta_step(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                              const at::Tensor& x_support, const at::Tensor& y_support, const at::Tensor& x_query,
                              const at::Tensor& y_query, int64_t inner_steps, bool first_order, c10::string_view loss,
                              int64_t first_adapted, bool learn_lr, c10::string_view optimizer,
                              c10::ArrayRef<double> settings, bool per_step_lr, c10::ArrayRef<double> step_weights) {
  const std::vector<at::Tensor> updated =
      meta_step_update("maml_mlp_meta_step_", params, lr, grads, state, learn_lr, optimizer, settings).first;
  return meta_step_on(params, lr, grads, state, updated, x_support, y_support, x_query, y_query, inner_steps,
                      first_order, loss, first_adapted, learn_lr, optimizer, settings, per_step_lr, step_weights);
}

}  // namespace

std::pair<std::vector<at::Tensor>, OptimizerUpdate> meta_step_update(const char* op, at::TensorList params,
                                                                     at::TensorList lr, at::TensorList grads,
                                                                     at::TensorList state, bool learn_lr,
                                                                     c10::string_view optimizer,
                                                                     c10::ArrayRef<double> settings) {
  std::vector<at::Tensor> updated(params.begin(), params.end());
  if (learn_lr) {
    TORCH_CHECK_VALUE(lr.size() == params.size(), op, ": learned rates need one lr tensor per param, got ",
                      lr.size());
    updated.insert(updated.end(), lr.begin(), lr.end());
  }
  OptimizerUpdate update = parse_optimizer(op, optimizer, settings, updated, grads, state);
  return {std::move(updated), std::move(update)};
}

void check_meta_steps_args(const char* op, at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                           const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                           int64_t inner_steps, LossKind kind, int64_t first_adapted, bool per_step_lr) {
  TORCH_CHECK_VALUE(x_support.dim() >= 1 && x_support.size(0) >= 1, op,
                    ": x_support must be [S, T, K, ...], S >= 1 meta-batches stacked, got ", x_support.sizes());
  const int64_t steps = x_support.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"y_support", y_support},
                                {"x_query", x_query}, {"y_query", y_query}}) {
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == steps, op, ": ", name, " must stack S = ", steps,
                      " meta-batches like x_support, got ", t.sizes());
  }
  check_maml_args(params, lr, x_support.select(0, 0), y_support.select(0, 0), x_query.select(0, 0),
                  y_query.select(0, 0), inner_steps, kind, first_adapted, op, per_step_lr);
  if (kind == LossKind::kCrossEntropy) {
    const int64_t classes = params[params.size() - 2].size(0);
    check_labels_in_range(op, "y_support", y_support, classes);
    check_labels_in_range(op, "y_query", y_query, classes);
  }
}

at::Tensor meta_steps_in_turn(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                              at::TensorList updated, const at::Tensor& x_support, const at::Tensor& y_support,
                              const at::Tensor& x_query, const at::Tensor& y_query, int64_t inner_steps,
                              bool first_order, c10::string_view loss, int64_t first_adapted, bool learn_lr,
                              c10::string_view optimizer, c10::ArrayRef<double> settings, bool per_step_lr,
                              c10::ArrayRef<double> step_weights) {
  const int64_t steps = x_support.size(0);
  std::vector<double> step_settings(settings.begin(), settings.end());
  std::vector<at::Tensor> losses;
  losses.reserve(steps);
  for (int64_t s = 0; s < steps; ++s) {
    losses.push_back(meta_step_on(params, lr, grads, state, updated, x_support.select(0, s), y_support.select(0, s),
                                  x_query.select(0, s), y_query.select(0, s), inner_steps, first_order, loss,
                                  first_adapted, learn_lr, optimizer, step_settings, per_step_lr, step_weights));
    if (s == 0) momentum_buffers_filled(optimizer, step_settings);
  }
  return at::stack(losses);
}

namespace {

at::Tensor maml_mlp_meta_steps(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                               const at::Tensor& x_support, const at::Tensor& y_support, const at::Tensor& x_query,
                               const at::Tensor& y_query, int64_t inner_steps, bool first_order,
                               c10::string_view loss, int64_t first_adapted, bool learn_lr, c10::string_view optimizer,
                               c10::ArrayRef<double> settings, bool per_step_lr, c10::ArrayRef<double> step_weights) {
  const char* op = "maml_mlp_meta_steps_";
  const std::vector<at::Tensor> updated =
      meta_step_update(op, params, lr, grads, state, learn_lr, optimizer, settings).first;
  check_meta_steps_args(op, params, lr, x_support, y_support, x_query, y_query, inner_steps,
                        maml_loss_kind(loss, op), first_adapted, per_step_lr);
  return meta_steps_in_turn(params, lr, grads, state, updated, x_support, y_support, x_query, y_query, inner_steps,
                            first_order, loss, first_adapted, learn_lr, optimizer, settings, per_step_lr,
                            step_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CompositeExplicitAutograd, m) {
  m.impl("maml_mlp_meta_step_", &maml_mlp_meta_step);
  m.impl("maml_mlp_meta_steps_", &maml_mlp_meta_steps);
}

}  // namespace metalearn_fast
