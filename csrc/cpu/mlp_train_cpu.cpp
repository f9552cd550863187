// mlp_train_epoch_ on the CPU: small MLPs in loops written here, one batch after another.
//
// A minibatch step of the founding example's MLP (10-128-1, 32 examples) is ~10 us of arithmetic,
// while the same step through torch costs ~200 us: some forty ATen dispatches, an autograd graph and
// a Python optimizer step. Here the whole epoch is one call: each batch's forward pass, loss, backward
// pass (into the .grad tensors) and optimizer update run in a workspace of a few tens of kilobytes,
// with no ATen call in between. Larger layers (where the GEMMs dominate), other dtypes and CPUs
// without AVX2 take the ATen loop of composite/mlp_train.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "composite/mlp_train.h"
#include "composite/optimizer.h"
#include "cpu/optimizer_cpu.h"
#include "cpu/small_kernels.h"

namespace metalearn_fast {
namespace {

#ifdef METALEARN_FAST_SMALL_KERNELS
METALEARN_FAST_BEGIN_AVX2
using namespace small;

template <typename T>
class EpochKernel {
 public:
  EpochKernel(at::TensorList params, at::TensorList grads, at::TensorList state, const OptimizerUpdate& update,
              int64_t batch_size)
      : update_(update), layers_(static_cast<int64_t>(params.size() / 2)) {
    int64_t widest = 0;
    for (int64_t l = 0; l < layers_; ++l) {
      in_.push_back(params[2 * l].size(1));
      out_.push_back(params[2 * l].size(0));
      widest = std::max({widest, in_.back(), out_.back()});
    }
    for (size_t i = 0; i < params.size(); ++i) {
      param_.push_back(params[i].mutable_data_ptr<T>());
      grad_.push_back(grads[i].mutable_data_ptr<T>());
      numel_.push_back(params[i].numel());
    }
    for (const auto& t : state) state_.push_back(t);
    int64_t total = 0;
    for (int64_t l = 0; l < layers_; ++l) total += in_[l] * out_[l] + batch_size * in_[l];  // W^T, a_l
    total += 4 * batch_size * widest;  // logits, probabilities, two gradient buffers
    buffer_.assign(total, T(0));
    T* next = buffer_.data();
    for (int64_t l = 0; l < layers_; ++l) {
      weight_t_.push_back(next);
      next += in_[l] * out_[l];
      input_.push_back(next);
      next += batch_size * in_[l];
    }
    for (T** piece : {&logits_, &probs_, &d_, &e_}) {
      *piece = next;
      next += batch_size * widest;
    }
    for (int64_t l = 0; l < layers_; ++l) transpose(weight_t_[l], param_[2 * l], out_[l], in_[l]);
  }

  // One minibatch: x_rows [rows, I0], target rows (values [rows, C] or labels [rows]); returns its loss.
  double step(const T* x_rows, const T* y_rows, const int64_t* labels, int64_t rows, LossKind kind) {
    const int64_t L = layers_, C = out_[L - 1];
    auto input = [&](int64_t l) { return l == 0 ? x_rows : input_[l]; };
    for (int64_t l = 0; l < L; ++l) {
      T* z = l + 1 < L ? input_[l + 1] : logits_;
      mm(z, input(l), weight_t_[l], rows, in_[l], out_[l], Start::kRow, param_[2 * l + 1]);
      if (l + 1 < L) relu(z, rows * out_[l]);
    }
    const double loss = loss_and_grad(kind, logits_, y_rows, labels, rows, C, 1.0, d_, probs_);
    T* d = d_;
    T* e = e_;
    for (int64_t l = L - 1; l >= 0; --l) {
      mm_tn(grad_[2 * l], d, input(l), rows, out_[l], in_[l], Start::kZero);
      column_sums(grad_[2 * l + 1], d, rows, out_[l], Start::kZero);
      if (l > 0) {
        mm(e, d, param_[2 * l], rows, out_[l], in_[l], Start::kZero);
        mask(e, input_[l], rows * in_[l]);
        std::swap(d, e);
      }
    }
    for (size_t i = 0; i < param_.size(); ++i) {
      const TensorState<T> t = tensor_state<T>(update_, state_, i);
      update_tensor<T>(update_.kind, update_.params[i], param_[i], grad_[i], t.state1, t.state2, 0, numel_[i], t.step);
    }
    for (int64_t l = 0; l < L; ++l) transpose(weight_t_[l], param_[2 * l], out_[l], in_[l]);
    return loss;
  }

  // every momentum buffer holds a history after the first step
  void after_first_step() { update_.momentum_buffers_filled(); }

 private:
  OptimizerUpdate update_;
  int64_t layers_;
  std::vector<int64_t> in_, out_, numel_;
  std::vector<T*> param_, grad_;
  std::vector<at::Tensor> state_;
  std::vector<T> buffer_;
  std::vector<T*> weight_t_, input_;  // per layer: W^T [I, O]; a_l [batch, I] (a_0 unused: x's rows)
  T *logits_ = nullptr, *probs_ = nullptr, *d_ = nullptr, *e_ = nullptr;
};

template <typename T>
at::Tensor train_epoch_small(at::TensorList params, at::TensorList grads, at::TensorList state, const at::Tensor& x,
                             const at::Tensor& y, const std::optional<at::Tensor>& order, LossKind kind,
                             const TrainBatches& batches, const OptimizerUpdate& update) {
  EpochKernel<T> kernel(params, grads, state, update, batches.size);
  const int64_t features = x.size(1), width = kind == LossKind::kMse ? y.size(1) : 1;
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  const T* x_data = xc.const_data_ptr<T>();
  const T* y_values = kind == LossKind::kMse ? yc.const_data_ptr<T>() : nullptr;
  const int64_t* y_labels = kind == LossKind::kMse ? nullptr : yc.const_data_ptr<int64_t>();
  at::Tensor losses = at::empty({batches.count}, params[0].options());
  T* loss_data = losses.mutable_data_ptr<T>();
  // a shuffled batch is gathered into contiguous rows first
  std::vector<T> x_rows(order.has_value() ? batches.size * features : 0);
  std::vector<T> y_rows(order.has_value() && y_values ? batches.size * width : 0);
  std::vector<int64_t> label_rows(order.has_value() && y_labels ? batches.size : 0);
  const int64_t* index = order.has_value() ? order->const_data_ptr<int64_t>() : nullptr;
  for (int64_t batch = 0; batch < batches.count; ++batch) {
    const int64_t start = batch * batches.size, rows = batches.rows(batch);
    const T* xb = x_data + start * features;
    const T* yb = y_values ? y_values + start * width : nullptr;
    const int64_t* lb = y_labels ? y_labels + start : nullptr;
    if (index) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t e = index[start + r];
        std::memcpy(x_rows.data() + r * features, x_data + e * features, features * sizeof(T));
        if (y_values) std::memcpy(y_rows.data() + r * width, y_values + e * width, width * sizeof(T));
        if (y_labels) label_rows[r] = y_labels[e];
      }
      xb = x_rows.data();
      yb = y_values ? y_rows.data() : nullptr;
      lb = y_labels ? label_rows.data() : nullptr;
    }
    loss_data[batch] = static_cast<T>(kernel.step(xb, yb, lb, rows, kind));
    if (batch == 0) kernel.after_first_step();
  }
  return losses;
}

METALEARN_FAST_END_AVX2

// Whether the per-batch kernel takes this call: small layers, float or double, contiguous parameters,
// gradients and state (it writes into them in place).
bool takes_small_kernel(at::TensorList params, at::TensorList grads, at::TensorList state) {
  if (!cpu_has_avx2_fma()) return false;
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!params[i].is_contiguous() || !grads[i].is_contiguous()) return false;
    if (i % 2 == 0 && params[i].numel() > kMaxSmallLayer) return false;
  }
  for (const auto& t : state) {
    if (!t.is_contiguous()) return false;
  }
  return true;
}
#endif  // METALEARN_FAST_SMALL_KERNELS

at::Tensor mlp_train_epoch_cpu(at::TensorList params, at::TensorList grads, at::TensorList state, const at::Tensor& x,
                               const at::Tensor& y, const std::optional<at::Tensor>& order, int64_t batch_size,
                               c10::string_view loss, c10::string_view optimizer, c10::ArrayRef<double> settings) {
  const auto [kind, batches] = check_mlp_train_args(params, grads, x, y, order, batch_size, loss);
  const OptimizerUpdate update = parse_optimizer("mlp_train_epoch_", optimizer, settings, params, grads, state);
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (takes_small_kernel(params, grads, state)) {
    const std::optional<at::Tensor> index = order.has_value() ? std::optional(order->contiguous()) : std::nullopt;
    return AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "mlp_train_epoch_cpu", [&] {
      return train_epoch_small<scalar_t>(params, grads, state, x, y, index, kind, batches, update);
    });
  }
#endif
  return mlp_train_epoch_aten(params, grads, state, x, y, order, kind, batches, update);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) { m.impl("mlp_train_epoch_", &mlp_train_epoch_cpu); }

}  // namespace metalearn_fast
