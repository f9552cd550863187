// linear_relu and its backward on the CPU.
// Forward: one (batched) GEMM with the bias as its accumulator, then the ReLU in place in that buffer.
// Backward: one fused pass forms gz = grad_out * (out > 0) and reduces grad_bias, then the two GEMMs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "kernel_common.h"

namespace metalearn_fast {
namespace {

at::Tensor linear_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_linear_relu_args(x, weight, bias);
  at::Tensor out = x.dim() == 2 ? at::addmm(bias, x, weight.t())
                                : at::baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2));
  return out.relu_();
}

// gz[t,n,o] = out[t,n,o] > 0 ? grad_out[t,n,o] : 0 and grad_bias[t,o] = sum_n gz[t,n,o], in one pass.
// Work is split over (task, block of columns) so that each thread owns its grad_bias entries and the
// inner loop over a row's columns is contiguous (the compiler vectorises the select and the add).
// gz is written only when kWriteGz (a GEMM needs it), grad_bias only when not null.
template <typename scalar_t, bool kWriteGz>
void relu_mask_and_bias_grad(const scalar_t* grad_out, const scalar_t* out, scalar_t* gz, scalar_t* grad_bias,
                             int64_t tasks, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (cols + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * std::min(cols, kBlock)));
  at::parallel_for(0, tasks * blocks, grain, [&](int64_t begin, int64_t end) {
    acc_t acc[kBlock];
    for (int64_t job = begin; job < end; ++job) {
      const int64_t t = job / blocks;
      const int64_t c0 = (job % blocks) * kBlock;
      const int64_t width = std::min(kBlock, cols - c0);
      std::fill(acc, acc + width, acc_t(0));
      for (int64_t n = 0; n < rows; ++n) {
        const int64_t base = (t * rows + n) * cols + c0;
        const scalar_t* g = grad_out + base;
        const scalar_t* o = out + base;
        for (int64_t c = 0; c < width; ++c) {
          const scalar_t v = o[c] > scalar_t(0) ? g[c] : scalar_t(0);
          if constexpr (kWriteGz) gz[base + c] = v;
          acc[c] += static_cast<acc_t>(v);
        }
      }
      if (grad_bias != nullptr) {
        for (int64_t c = 0; c < width; ++c) grad_bias[t * cols + c0 + c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_relu_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_in,
    std::array<bool, 3> output_mask) {
  check_linear_relu_backward_args(grad_out_in, x, weight, out_in);
  ReluBackwardPass pass = prepare_relu_backward(grad_out_in, out_in, output_mask);
  if (!pass.has_work()) return {std::nullopt, std::nullopt, std::nullopt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pass.out.scalar_type(), "linear_relu_backward_cpu", [&] {
    const scalar_t* grad_out = pass.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* out = pass.out.const_data_ptr<scalar_t>();
    scalar_t* grad_bias = pass.grad_bias ? pass.grad_bias->mutable_data_ptr<scalar_t>() : nullptr;
    if (pass.gz.defined()) {
      relu_mask_and_bias_grad<scalar_t, true>(grad_out, out, pass.gz.mutable_data_ptr<scalar_t>(), grad_bias,
                                              pass.tasks, pass.rows, pass.cols);
    } else {
      relu_mask_and_bias_grad<scalar_t, false>(grad_out, out, nullptr, grad_bias, pass.tasks, pass.rows, pass.cols);
    }
  });
  auto [grad_x, grad_weight] = input_and_weight_grads(pass.gz, x, weight, output_mask);
  return {grad_x, grad_weight, pass.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) {
  m.impl("linear_relu", &linear_relu_cpu);
  m.impl("linear_relu_backward", &linear_relu_backward_cpu);
}

}  // namespace metalearn_fast
