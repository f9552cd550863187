// The Autograd kernels of the ops that train in place (optimizer_step_, mlp_train_epoch_,
// maml_mlp_meta_step_, maml_mlp_meta_steps_, reptile_mlp_step_). Like torch.optim's step, they update
// parameters outside autograd: each runs its device kernel below the autograd keys, then bumps the version
// counter of every tensor it wrote, as ATen's in-place ops do, so that autograd still detects a saved tensor
// that changed since.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>

namespace metalearn_fast {
namespace {

using at::Tensor;
using at::TensorList;

void bump_versions(std::initializer_list<TensorList> lists) {
  for (TensorList list : lists) {
    for (const Tensor& t : list) torch::autograd::impl::bump_version(t);
  }
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

void optimizer_step_autograd(TensorList params, TensorList grads, TensorList state, c10::string_view optimizer,
                             c10::ArrayRef<double> settings) {
  static auto op = find<void(TensorList, TensorList, TensorList, c10::string_view, c10::ArrayRef<double>)>(
      "metalearn_fast::optimizer_step_");
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(params, grads, state, optimizer, settings);
  }
  bump_versions({params, state});
}

Tensor mlp_train_epoch_autograd(TensorList params, TensorList grads, TensorList state, const Tensor& x,
                                const Tensor& y, const std::optional<Tensor>& order, int64_t batch_size,
                                c10::string_view loss, c10::string_view optimizer, c10::ArrayRef<double> settings) {
  static auto op = find<Tensor(TensorList, TensorList, TensorList, const Tensor&, const Tensor&,
                               const std::optional<Tensor>&, int64_t, c10::string_view, c10::string_view,
                               c10::ArrayRef<double>)>("metalearn_fast::mlp_train_epoch_");
  Tensor losses;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    losses = op.call(params, grads, state, x, y, order, batch_size, loss, optimizer, settings);
  }
  bump_versions({params, grads, state});
  return losses;
}

// maml_mlp_meta_step_ and maml_mlp_meta_steps_ (one signature)
template <const char* kName>
Tensor maml_mlp_meta_step_autograd(TensorList params, TensorList lr, TensorList grads, TensorList state,
                                   const Tensor& x_support, const Tensor& y_support, const Tensor& x_query,
                                   const Tensor& y_query, int64_t inner_steps, bool first_order, c10::string_view loss,
                                   int64_t first_adapted, bool learn_lr, c10::string_view optimizer,
                                   c10::ArrayRef<double> settings, bool per_step_lr,
                                   c10::ArrayRef<double> step_weights) {
  static auto op = find<Tensor(TensorList, TensorList, TensorList, TensorList, const Tensor&, const Tensor&,
                               const Tensor&, const Tensor&, int64_t, bool, c10::string_view, int64_t, bool,
                               c10::string_view, c10::ArrayRef<double>, bool, c10::ArrayRef<double>)>(kName);
  Tensor value;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    value = op.call(params, lr, grads, state, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                    first_adapted, learn_lr, optimizer, settings, per_step_lr, step_weights);
  }
  bump_versions({params, grads, state});
  if (learn_lr) bump_versions({lr});
  return value;
}
constexpr char kMetaStep[] = "metalearn_fast::maml_mlp_meta_step_";
constexpr char kMetaSteps[] = "metalearn_fast::maml_mlp_meta_steps_";

Tensor reptile_mlp_step_autograd(TensorList params, const Tensor& x_support, const Tensor& y_support,
                                 int64_t inner_steps, double inner_lr, double outer_lr, c10::string_view loss) {
  static auto op = find<Tensor(TensorList, const Tensor&, const Tensor&, int64_t, double, double, c10::string_view)>(
      "metalearn_fast::reptile_mlp_step_");
  Tensor value;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    value = op.call(params, x_support, y_support, inner_steps, inner_lr, outer_lr, loss);
  }
  bump_versions({params});
  return value;
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, Autograd, m) {
  m.impl("reptile_mlp_step_", &reptile_mlp_step_autograd);
  m.impl("optimizer_step_", &optimizer_step_autograd);
  m.impl("mlp_train_epoch_", &mlp_train_epoch_autograd);
  m.impl("maml_mlp_meta_step_", &maml_mlp_meta_step_autograd<kMetaStep>);
  m.impl("maml_mlp_meta_steps_", &maml_mlp_meta_step_autograd<kMetaSteps>);
}

}  // namespace metalearn_fast
