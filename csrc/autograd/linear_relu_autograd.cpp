// Autograd for linear_relu and linear_relu_backward, in C++ so that a layer costs one autograd node
// and no Python on the backward pass (a Python-level autograd.Function costs tens of microseconds per
// call, more than the arithmetic of a meta-batch layer). Registered for every device at once.
//
// linear_relu saves (x, weight, out): the mask is out > 0 and the next layer keeps out anyway.
// linear_relu_backward is itself differentiable (second-order MAML), with m = out > 0:
//   d grad_out = m * (ggx @ weight^T + x @ ggw^T + ggb),  d weight = gz^T @ ggx,  d x = gz @ ggw,  d out = 0.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace metalearn_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

at::Tensor call_linear_relu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::linear_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, weight, bias);
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> call_linear_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::linear_relu_backward", "")
                       .typed<std::tuple<OptionalTensor, OptionalTensor, OptionalTensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           std::array<bool, 3>)>();
  return op.call(grad_out, x, weight, out, mask);
}

at::Tensor value_or_undefined(const OptionalTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// The requested gradients, in (x, weight, bias) order with undefined tensors where not requested.
variable_list unpack(const variable_list& outputs, std::array<bool, 3> mask) {
  variable_list all(3);
  for (size_t i = 0, k = 0; i < 3; ++i) {
    if (mask[i]) all[i] = outputs[k++];
  }
  return all;
}

class LinearReLUBackwardFunction : public torch::autograd::Function<LinearReLUBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& weight, const at::Tensor& out, std::array<bool, 3> mask) {
    std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> grads;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      grads = call_linear_relu_backward(grad_out, x, weight, out, mask);
    }
    ctx->save_for_backward({grad_out, x, weight, out});
    ctx->saved_data["mask"] = static_cast<int64_t>(mask[0] | (mask[1] << 1) | (mask[2] << 2));
    // Autograd outputs must be defined tensors, so only the requested gradients are outputs.
    variable_list outputs;
    for (const auto& g : {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)}) {
      if (g.has_value()) outputs.push_back(*g);
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list incoming) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad_out = saved[0];
    const at::Tensor& x = saved[1];
    const at::Tensor& weight = saved[2];
    const at::Tensor mask = saved[3] > 0;
    at::Tensor gg[3];
    const int64_t requested = ctx->saved_data["mask"].toInt();
    for (size_t i = 0, k = 0; i < 3; ++i) {
      if (requested & (1 << i)) gg[i] = incoming[k++];
    }
    const at::Tensor& ggx = gg[0];
    const at::Tensor& ggw = gg[1];
    const at::Tensor& ggb = gg[2];
    at::Tensor d_grad_out, d_x, d_weight;
    if (ctx->needs_input_grad(0)) {
      at::Tensor sum;
      if (ggx.defined()) sum = at::matmul(ggx, weight.transpose(-1, -2));
      if (ggw.defined()) {
        at::Tensor term = at::matmul(x, ggw.transpose(-1, -2));
        sum = sum.defined() ? sum + term : term;
      }
      if (ggb.defined()) sum = sum.defined() ? sum + ggb.unsqueeze(-2) : ggb.unsqueeze(-2).expand_as(grad_out);
      if (sum.defined()) d_grad_out = sum * mask;
    }
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(2)) {
      const at::Tensor gz = grad_out * mask;
      if (ctx->needs_input_grad(1) && ggw.defined()) d_x = at::matmul(gz, ggw);
      if (ctx->needs_input_grad(2) && ggx.defined()) d_weight = at::matmul(gz.transpose(-1, -2), ggx);
    }
    return {d_grad_out, d_x, d_weight, at::Tensor(), at::Tensor()};
  }
};

class LinearReLUFunction : public torch::autograd::Function<LinearReLUFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = call_linear_relu(x, weight, bias);
    }
    ctx->save_for_backward({x, weight, out});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    if (!at::GradMode::is_enabled()) {
      // a first-order backward records nothing: call the kernel without the autograd wrapper
      at::AutoDispatchBelowADInplaceOrView guard;
      auto [grad_x, grad_weight, grad_bias] = call_linear_relu_backward(grads[0], saved[0], saved[1], saved[2], mask);
      return {value_or_undefined(grad_x), value_or_undefined(grad_weight), value_or_undefined(grad_bias)};
    }
    auto result = LinearReLUBackwardFunction::apply(grads[0], saved[0], saved[1], saved[2], mask);
    return unpack(result, mask);
  }
};

at::Tensor linear_relu_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  return LinearReLUFunction::apply(x, weight, bias);
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor> linear_relu_backward_autograd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    std::array<bool, 3> mask) {
  auto r = unpack(LinearReLUBackwardFunction::apply(grad_out, x, weight, out, mask), mask);
  auto wrap = [](const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : OptionalTensor(); };
  return {wrap(r[0]), wrap(r[1]), wrap(r[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, Autograd, m) {
  m.impl("linear_relu", &linear_relu_autograd);
  m.impl("linear_relu_backward", &linear_relu_backward_autograd);
}

}  // namespace metalearn_fast
