// Argument checks shared by the CPU and CUDA kernels. Bad shapes and devices raise ValueError,
// bad dtypes TypeError, each naming the argument; reference.py raises the same for the fallback.
#pragma once
#include <ATen/ATen.h>

namespace metalearn_fast {

// x [T,N,I]|[N,I], weight [T,O,I]|[O,I]; checks dtype, device, rank, T, I and emptiness.
inline void check_x_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
                   ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), op, ": weight must be on x's device ", x.device(), ", got ",
                    weight.device());
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, op, ": x must be [N, I] or [T, N, I], got shape ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == x.dim(), op, ": weight must be ", x.dim() == 2 ? "[O, I]" : "[T, O, I]",
                    " to match x of shape ", x.sizes(), ", got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 || weight.size(0) == x.size(0), op, ": weight has T = ", weight.size(0),
                    " tasks but x has T = ", x.size(0));
  TORCH_CHECK_VALUE(weight.size(-1) == x.size(-1), op, ": weight must have I = x.size(-1) = ", x.size(-1),
                    " input features, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": x is empty (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(weight.numel() > 0, op, ": weight is empty (shape ", weight.sizes(), ")");
}

// Class labels y (int64) in [0, classes): an out-of-range label would index past the logits. On the CPU the
// error names the labels found; on a GPU the check is a device-side assert, so that a training step never
// waits for the device to report them (no host sync).
inline void check_labels_in_range(const char* op, const char* name, const at::Tensor& y, int64_t classes) {
  if (y.numel() == 0) return;
  if (!y.device().is_cpu()) {
    at::_assert_async(at::logical_and(y >= 0, y < classes).all(), std::string(op) + ": " + name +
                      " must hold class labels in [0, " + std::to_string(classes) + ")");
    return;
  }
  const auto [low, high] = at::aminmax(y);
  const int64_t lowest = low.item<int64_t>(), highest = high.item<int64_t>();
  TORCH_CHECK_VALUE(lowest >= 0 && highest < classes, op, ": ", name, " must hold class labels in [0, ", classes,
                    "), got labels from ", lowest, " to ", highest);
}

// A tensor shaped like the layer's output [T,N,O]|[N,O] (the output itself, or its gradient).
inline void check_like_out(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                           const at::Tensor& weight) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ",
                    t.device());
  auto expected = x.sizes().vec();
  expected.back() = weight.size(-2);
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must have shape ", expected, ", got ",
                    t.sizes());
}

inline void check_linear_relu_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const char* op = "linear_relu";
  check_x_weight(op, x, weight);
  TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(),
                   ", got ", bias.scalar_type());
  TORCH_CHECK_VALUE(bias.device() == x.device(), op, ": bias must be on x's device ", x.device(), ", got ",
                    bias.device());
  auto expected = weight.sizes().vec();
  expected.pop_back();
  TORCH_CHECK_VALUE(bias.sizes() == at::IntArrayRef(expected), op, ": bias must have shape ", expected,
                    " to match weight of shape ", weight.sizes(), ", got ", bias.sizes());
}

inline void check_linear_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& out) {
  const char* op = "linear_relu_backward";
  check_x_weight(op, x, weight);
  check_like_out(op, "grad_out", grad_out, x, weight);
  check_like_out(op, "out", out, x, weight);
}

// How lr[i] maps onto params[i]: the element e of params[i] uses lr[(e / div) % mod].
// This covers a scalar (mod = 1), one rate per task ([T, 1, ...], div = the rest) and one per
// parameter element ([*S] or [T, *S], div = 1), which are the rates the Python layer passes.
struct LrLayout {
  int64_t div = 1;
  int64_t mod = 1;
};

inline LrLayout lr_layout(const at::Tensor& param, const at::Tensor& lr, size_t index) {
  TORCH_CHECK_VALUE(lr.dim() <= param.dim(), "sgd_step: lr[", index, "] of shape ", lr.sizes(),
                    " does not broadcast to params[", index, "] of shape ", param.sizes());
  const int64_t offset = param.dim() - lr.dim();
  int64_t first = -1, last = -1;
  for (int64_t d = 0; d < lr.dim(); ++d) {
    if (lr.size(d) != 1) {
      if (first < 0) first = d + offset;
      last = d + offset;
    }
  }
  LrLayout layout;
  if (first < 0) return layout;
  for (int64_t d = first; d <= last; ++d) {
    TORCH_CHECK_VALUE(lr.size(d - offset) == param.size(d), "sgd_step: lr[", index, "] of shape ", lr.sizes(),
                      " must be a scalar, one rate per task [T, 1, ...], or one per element of params[", index,
                      "] of shape ", param.sizes());
    layout.mod *= param.size(d);
  }
  for (int64_t d = last + 1; d < param.dim(); ++d) layout.div *= param.size(d);
  return layout;
}

inline void check_sgd_step_args(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  TORCH_CHECK_VALUE(!params.empty(), "sgd_step: params is empty");
  TORCH_CHECK_VALUE(grads.size() == params.size(), "sgd_step: grads must hold one tensor per param (",
                    params.size(), "), got ", grads.size());
  TORCH_CHECK_VALUE(lr.size() == 1 || lr.size() == params.size(), "sgd_step: lr must hold one tensor or one per param (",
                    params.size(), "), got ", lr.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    const auto& r = lr[lr.size() == 1 ? 0 : i];
    TORCH_CHECK_TYPE(at::isFloatingType(p.scalar_type()), "sgd_step: params[", i, "] must be floating-point, got ",
                     p.scalar_type());
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), "sgd_step: params must share one dtype, params[0] is ",
                     params[0].scalar_type(), " and params[", i, "] is ", p.scalar_type());
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "sgd_step: params must share one device, params[0] is on ",
                      params[0].device(), " and params[", i, "] on ", p.device());
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), "sgd_step: grads[", i, "] must have dtype ",
                     p.scalar_type(), " like params[", i, "], got ", g.scalar_type());
    TORCH_CHECK_TYPE(r.scalar_type() == p.scalar_type(), "sgd_step: lr must have dtype ", p.scalar_type(),
                     " like params[", i, "], got ", r.scalar_type());
    TORCH_CHECK_VALUE(g.device() == p.device() && r.device() == p.device(), "sgd_step: grads[", i,
                      "] and lr must be on the device of params[", i, "] (", p.device(), ")");
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "sgd_step: grads[", i, "] must have shape ", p.sizes(),
                      " like params[", i, "], got ", g.sizes());
    lr_layout(p, r, i);
  }
}

}  // namespace metalearn_fast
