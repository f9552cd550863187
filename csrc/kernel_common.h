// Pieces the CPU and CUDA kernels share around their device-specific loops.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

namespace metalearn_fast {

// d^T @ a per task ([T, K, O], [T, K, I] -> [T, O, I]; also unbatched). ATen's CPU GEMM paths for
// small matrices run several times faster on (a^T @ d)^T when O >= I (measured on the meta-batch and
// founding-example shapes), so that orientation is used there and the result is a transposed view.
// Large GEMMs run as fast either way, and the transposed result would cost a copy.
constexpr int64_t kSmallGemm = 1 << 18;  // K * O * I

inline at::Tensor weight_grad(const at::Tensor& d, const at::Tensor& a) {
  const bool batched = d.dim() == 3;
  const int64_t size = d.size(-2) * d.size(-1) * a.size(-1);
  if (d.is_cpu() && d.size(-1) >= a.size(-1) && size <= kSmallGemm) {
    return batched ? at::bmm(a.transpose(1, 2), d).transpose(1, 2) : at::mm(a.t(), d).t();
  }
  return batched ? at::bmm(d.transpose(1, 2), a) : at::mm(d.t(), a);
}

// linear_relu_backward around the device's fused pass (gz = grad_out * (out > 0), grad_bias = sum_N gz):
// grad_out and out made contiguous and seen as [tasks, rows, cols]; gz allocated where a GEMM needs it,
// grad_bias where output_mask asks for it.
struct ReluBackwardPass {
  at::Tensor grad_out;
  at::Tensor out;
  at::Tensor gz;
  std::optional<at::Tensor> grad_bias;
  int64_t tasks;
  int64_t rows;
  int64_t cols;

  bool has_work() const { return gz.defined() || grad_bias.has_value(); }
};

inline ReluBackwardPass prepare_relu_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                              std::array<bool, 3> output_mask) {
  const bool batched = out.dim() == 3;
  ReluBackwardPass pass{grad_out.contiguous(), out.contiguous(), at::Tensor(), std::nullopt,
                        batched ? out.size(0) : 1, out.size(-2), out.size(-1)};
  if (output_mask[0] || output_mask[1]) pass.gz = at::empty_like(pass.out, at::MemoryFormat::Contiguous);
  if (output_mask[2]) {
    pass.grad_bias = batched ? at::empty({pass.tasks, pass.cols}, out.options()) : at::empty({pass.cols}, out.options());
  }
  return pass;
}

// linear_relu_backward's GEMMs from gz = grad_out * (out > 0): grad_x = gz @ weight and
// grad_weight = gz^T @ x, each only where output_mask asks for it.
inline std::pair<std::optional<at::Tensor>, std::optional<at::Tensor>> input_and_weight_grads(
    const at::Tensor& gz, const at::Tensor& x, const at::Tensor& weight, std::array<bool, 3> output_mask) {
  const bool batched = x.dim() == 3;
  std::optional<at::Tensor> grad_x, grad_weight;
  if (output_mask[0]) grad_x = batched ? at::bmm(gz, weight) : at::mm(gz, weight);
  if (output_mask[1]) grad_weight = weight_grad(gz, x).contiguous();  // the op's outputs are contiguous
  return {grad_x, grad_weight};
}

// sgd_step: `step_into(params, outs)` writes the new values into fresh contiguous outputs.
template <typename StepInto>
std::vector<at::Tensor> update_out_of_place(at::TensorList params, StepInto&& step_into) {
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const auto& p : params) outs.push_back(at::empty_like(p, at::MemoryFormat::Contiguous));
  step_into(params, at::TensorList(outs));
  return outs;
}

// sgd_step_: `step_into(params, outs)` writes the new values into outs. A non-contiguous param is
// updated through a contiguous copy that is copied back; a contiguous one is updated in place.
template <typename StepInto>
void update_in_place(at::TensorList params, StepInto&& step_into) {
  std::vector<at::Tensor> staged;
  staged.reserve(params.size());
  for (const auto& p : params) staged.push_back(p.is_contiguous() ? p : at::empty_like(p, at::MemoryFormat::Contiguous));
  step_into(params, at::TensorList(staged));
  for (size_t i = 0; i < params.size(); ++i) {
    if (!staged[i].is_same(params[i])) params[i].copy_(staged[i]);
  }
}

}  // namespace metalearn_fast
