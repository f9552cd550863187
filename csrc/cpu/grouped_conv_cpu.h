// A grouped 2-D convolution and its backward pass, direct on the CPU, for convnet.py's meta-batch convolutions
// (groups = tasks) where each task has few output pixels: oneDNN's grouped kernels cost a quarter to half a
// millisecond a call whatever the size, these a few hundredths at conv4's late blocks (grouped_conv_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace metalearn_fast {

// Whether the direct kernels take these channel counts per group on this CPU: cpu_simd() is AVX2 or better and
// the input channels are a multiple of one register's lanes of dtype, or (without the input's gradient) the
// output channels are (the first block's few input channels).
bool grouped_conv_takes(at::ScalarType dtype, int64_t in_channels, int64_t out_channels, bool need_input);

// x [N, G*Cin, H, W], weight [G*C, Cin, KH, KW], bias [G*C] or undefined -> [N, G*C, OH, OW], channels-last:
// torch.nn.functional.conv2d(x, weight, bias, stride, padding, groups=G) (no dilation).
at::Tensor grouped_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, int64_t groups);

// The gradients of sum(g * grouped_conv(x, weight, bias)) w.r.t. x, weight and bias, each undefined unless asked
// for (the first two channels-last).
std::vector<at::Tensor> grouped_conv_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups,
                                              bool need_input, bool need_weight, bool need_bias);

}  // namespace metalearn_fast
