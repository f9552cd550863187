// BatchNorm (batch statistics) + ReLU of conv/BatchNorm/ReLU blocks for convnet.py (norm_relu_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace metalearn_fast {

// z -> (xhat = (z - mean) * invstd, a = relu(gamma xhat + beta), invstd), statistics per channel over N, H, W.
std::vector<at::Tensor> norm_relu(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta, double eps);

// The gradient at a -> (g_y = g_a where a > 0, undefined unless with_g_y; g_z = gamma unit with
// unit = invstd (g_y - mean(g_y) - xhat mean(g_y xhat)), written over g_a where g_a is channels-last (g_a is
// used up: one map less at the peak memory); g_gamma = sum(g_y xhat), g_beta = sum(g_y)).
std::vector<at::Tensor> norm_relu_backward(const at::Tensor& g_a, const at::Tensor& a, const at::Tensor& xhat,
                                           const at::Tensor& invstd, const at::Tensor& gamma, bool with_g_y);

// Along a direction, through y = gamma xhat + beta (xhat = BatchNorm of z with batch statistics), a = relu(y):
// dz -> (d_xhat, d_a, d_scale = d(std) / std per channel).
std::vector<at::Tensor> norm_relu_tangent(const at::Tensor& dz, const at::Tensor& xhat, const at::Tensor& a,
                                          const at::Tensor& invstd, const at::Tensor& gamma,
                                          const at::Tensor& d_gamma, const at::Tensor& d_beta);

// The derivative of the gradient at z (g_z = gamma unit, from norm_relu_backward's g_y, g_gamma and g_beta)
// along the same direction, given the derivative dg_a of the gradient at a: (dg_z, g_z (undefined unless
// with_g_z), dg_gamma, dg_beta).
std::vector<at::Tensor> norm_relu_tangent_backward(const at::Tensor& dg_a, const at::Tensor& a, const at::Tensor& xhat,
                                                   const at::Tensor& d_xhat, const at::Tensor& g_y,
                                                   const at::Tensor& invstd, const at::Tensor& gamma,
                                                   const at::Tensor& d_gamma, const at::Tensor& d_scale,
                                                   const at::Tensor& g_gamma, const at::Tensor& g_beta, bool with_g_z);

}  // namespace metalearn_fast
