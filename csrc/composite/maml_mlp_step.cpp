// maml_mlp_meta_step_: a whole MAML meta-step of an MLP in one call. The meta-loss and meta-gradient
// come from the device's maml_mlp_meta_grad kernel, the gradients are written into the .grad tensors,
// and the optimizer update (composite/optimizer.h) is applied to the parameters (and to the learned
// Meta-SGD rates) and to the optimizer's state. Device-neutral: both halves dispatch to the device's
// kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

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

at::Tensor maml_mlp_meta_step(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                              const at::Tensor& x_support, const at::Tensor& y_support, const at::Tensor& x_query,
                              const at::Tensor& y_query, int64_t inner_steps, bool first_order, c10::string_view loss,
                              int64_t first_adapted, bool learn_lr, c10::string_view optimizer,
                              c10::ArrayRef<double> settings, bool per_step_lr, c10::ArrayRef<double> step_weights) {
  const char* op = "maml_mlp_meta_step_";
  std::vector<at::Tensor> updated(params.begin(), params.end());
  if (learn_lr) {
    TORCH_CHECK_VALUE(lr.size() == params.size(), op, ": learned rates need one lr tensor per param, got ",
                      lr.size());
    updated.insert(updated.end(), lr.begin(), lr.end());
  }
  parse_optimizer(op, optimizer, settings, updated, grads, state);
  auto [value, param_grads, lr_grads] = call_maml_mlp_meta_grad(
      params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss, first_adapted, true, learn_lr,
      per_step_lr, step_weights);
  param_grads.insert(param_grads.end(), lr_grads.begin(), lr_grads.end());
  for (size_t i = 0; i < updated.size(); ++i) copy_into(grads[i], param_grads[i]);
  call_optimizer_step(updated, grads, state, optimizer, settings);
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CompositeExplicitAutograd, m) {
  m.impl("maml_mlp_meta_step_", &maml_mlp_meta_step);
}

}  // namespace metalearn_fast
