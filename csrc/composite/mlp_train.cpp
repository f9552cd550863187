// mlp_train_epoch_ in ATen ops: the step loop runs in C++, with the ops torch's autograd would run for
// the same model (addmm, relu, mse_loss or log_softmax + nll_loss, and their backward functions), so
// no Python, no autograd graph and no optimizer object is involved per step. One implementation for
// every device (CompositeExplicitAutograd); the CPU runs small MLPs in cpu/mlp_train_cpu.cpp instead.
#include "checks.h"
#include "composite/mlp_train.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "composite/optimizer.h"

namespace metalearn_fast {

std::pair<LossKind, TrainBatches> check_mlp_train_args(at::TensorList params, at::TensorList grads,
                                                       const at::Tensor& x, const at::Tensor& y,
                                                       const std::optional<at::Tensor>& order, int64_t batch_size,
                                                       c10::string_view loss) {
  const char* op = "mlp_train_epoch_";
  TORCH_CHECK_VALUE(loss == "mse" || loss == "cross_entropy", op, ": loss must be 'mse' or 'cross_entropy', got '",
                    std::string(loss), "'");
  const LossKind kind = loss == "mse" ? LossKind::kMse : LossKind::kCrossEntropy;
  TORCH_CHECK_VALUE(params.size() >= 2 && params.size() % 2 == 0, op,
                    ": params must be [weight_0, bias_0, weight_1, bias_1, ...], got ", params.size(), " tensors");
  TORCH_CHECK_VALUE(grads.size() == params.size(), op, ": grads must hold one tensor per param");
  const at::Tensor& first = params[0];
  for (size_t l = 0; l < params.size() / 2; ++l) {
    const at::Tensor& w = params[2 * l];
    const at::Tensor& b = params[2 * l + 1];
    TORCH_CHECK_VALUE(w.dim() == 2 && b.dim() == 1 && b.size(0) == w.size(0), op, ": params[", 2 * l, "] and params[",
                      2 * l + 1, "] must be a weight [O, I] and a bias [O], got ", w.sizes(), " and ", b.sizes());
    TORCH_CHECK_VALUE(l == 0 || w.size(1) == params[2 * l - 2].size(0), op, ": params[", 2 * l, "] must take ",
                      params[2 * l - 2].size(0), " inputs, got shape ", w.sizes());
    for (const at::Tensor* t : {&w, &b}) {
      TORCH_CHECK_TYPE(t->scalar_type() == first.scalar_type(), op, ": params must share one dtype");
      TORCH_CHECK_VALUE(t->device() == first.device(), op, ": params must share one device");
    }
  }
  const int64_t outputs = params[params.size() - 2].size(0);
  TORCH_CHECK_TYPE(x.scalar_type() == first.scalar_type(), op, ": x must have the params' dtype ",
                   first.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == first.device(), op, ": x must be on the params' device ", first.device(), ", got ",
                    x.device());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == first.size(1), op, ": x must be [N, ", first.size(1), "], got ",
                    x.sizes());
  const int64_t n = x.size(0);
  TORCH_CHECK_VALUE(n > 0, op, ": x holds no examples");
  TORCH_CHECK_VALUE(batch_size >= 1, op, ": batch_size must be >= 1, got ", batch_size);
  TORCH_CHECK_VALUE(y.device() == x.device(), op, ": y must be on x's device");
  if (kind == LossKind::kMse) {
    TORCH_CHECK_TYPE(y.scalar_type() == first.scalar_type(), op, ": y must have the params' dtype for mse");
    TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == n && y.size(1) == outputs, op, ": y must be [", n, ", ", outputs,
                      "] for mse, got ", y.sizes());
  } else {
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, op, ": y must be int64 class labels, got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == n, op, ": y must be [", n, "] class labels, got ", y.sizes());
    check_labels_in_range(op, "y", y, outputs);
  }
  if (order.has_value()) {
    const at::Tensor& o = *order;
    TORCH_CHECK_VALUE(o.scalar_type() == at::kLong && o.dim() == 1 && o.size(0) == n && o.device() == x.device(), op,
                      ": order must be an int64 [", n, "] index tensor on x's device, got ", o.scalar_type(), " ",
                      o.sizes());
    const auto [low, high] = at::aminmax(o);
    TORCH_CHECK_VALUE(low.item<int64_t>() >= 0 && high.item<int64_t>() < n, op, ": order must index the ", n,
                      " examples");
  }
  return {kind, TrainBatches{n, batch_size, (n + batch_size - 1) / batch_size}};
}

namespace {

// The loss of logits z [B, C] against target (values [B, C] or labels [B]) and its gradient w.r.t. z,
// both as torch computes them.
std::pair<at::Tensor, at::Tensor> loss_and_grad(LossKind kind, const at::Tensor& z, const at::Tensor& target) {
  const int64_t mean = at::Reduction::Mean;
  const at::Tensor one = at::ones({}, z.options());
  if (kind == LossKind::kMse) {
    return {at::mse_loss(z, target, mean), at::mse_loss_backward(one, z, target, mean)};
  }
  const at::Tensor log_probs = at::_log_softmax(z, 1, false);
  const auto [value, total_weight] = at::nll_loss_forward(log_probs, target, {}, mean, -100);
  const at::Tensor d_log_probs = at::nll_loss_backward(one, log_probs, target, {}, mean, -100, total_weight);
  return {value, at::_log_softmax_backward_data(d_log_probs, log_probs, 1, z.scalar_type())};
}

}  // namespace

at::Tensor mlp_train_epoch_aten(at::TensorList params, at::TensorList grads, at::TensorList state, const at::Tensor& x,
                                const at::Tensor& y, const std::optional<at::Tensor>& order, LossKind kind,
                                const TrainBatches& batches, OptimizerUpdate update) {
  const size_t layers = params.size() / 2;
  at::Tensor losses = at::empty({batches.count}, params[0].options());
  std::vector<at::Tensor> inputs(layers);  // a_l, the input of layer l (a_0 = the batch's x)
  for (int64_t batch = 0; batch < batches.count; ++batch) {
    const int64_t start = batch * batches.size, rows = batches.rows(batch);
    at::Tensor target;
    if (order.has_value()) {
      const at::Tensor index = order->narrow(0, start, rows);
      inputs[0] = x.index_select(0, index);
      target = y.index_select(0, index);
    } else {
      inputs[0] = x.narrow(0, start, rows);
      target = y.narrow(0, start, rows);
    }
    at::Tensor z;
    for (size_t l = 0; l < layers; ++l) {
      z = at::addmm(params[2 * l + 1], inputs[l], params[2 * l].t());
      if (l + 1 < layers) inputs[l + 1] = at::relu(z);
    }
    auto [value, d] = loss_and_grad(kind, z, target);
    losses.select(0, batch).copy_(value);
    for (size_t l = layers; l-- > 0;) {
      at::Tensor weight_grad = grads[2 * l], bias_grad = grads[2 * l + 1];  // handles on the .grad tensors
      at::mm_out(weight_grad, d.t(), inputs[l]);
      at::sum_out(bias_grad, d, 0);
      if (l > 0) d = at::threshold_backward(at::mm(d, params[2 * l]), inputs[l], 0);
    }
    // torch.optim's own ops, not the CPU's raw loops: their rounding differs from torch's kernels (which
    // fuse multiply-adds) by an ulp, and over a long run an ulp can tip a ReLU unit sitting on its
    // threshold, taking float32 training far from plain torch's. With layers this large the GEMMs
    // dominate, and the update costs nothing noticeable.
    optimizer_update_aten(update, params, grads, state);
    if (batch == 0) update.momentum_buffers_filled();
  }
  return losses;
}

namespace {

at::Tensor mlp_train_epoch_composite(at::TensorList params, at::TensorList grads, at::TensorList state,
                                     const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& order,
                                     int64_t batch_size, c10::string_view loss, c10::string_view optimizer,
                                     c10::ArrayRef<double> settings) {
  const auto [kind, batches] = check_mlp_train_args(params, grads, x, y, order, batch_size, loss);
  const OptimizerUpdate update = parse_optimizer("mlp_train_epoch_", optimizer, settings, params, grads, state);
  return mlp_train_epoch_aten(params, grads, state, x, y, order, kind, batches, update);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CompositeExplicitAutograd, m) {
  m.impl("mlp_train_epoch_", &mlp_train_epoch_composite);
}

}  // namespace metalearn_fast
