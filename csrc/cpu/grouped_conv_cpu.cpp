// A grouped 2-D convolution, its input gradient and its weight gradient, direct on channels-last memory: per
// task (group), tiles of output pixels by channels held in registers over a tap's input channels
// (grouped_conv_impl.h, compiled for AVX2 and for AVX-512, chosen per call by cpu_simd()). Tasks run in
// parallel; each sums in a fixed order, so the numbers do not depend on the thread count. convnet.py calls
// these where a task's maps are small and on a first block's few input channels (ATen's convolution is the
// oracle in tests/test_grouped_conv.py).
#include "grouped_conv_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/small_kernels.h"

namespace metalearn_fast {
namespace {

using at::Tensor;

// The shape of one task's convolution and, per output pixel and tap, the input pixel it reads.
struct Geometry {
  int64_t rows = 0, taps = 0, cin = 0, cout = 0;  // output pixels N*OH*OW; KH*KW; channels per task
  int64_t xs = 0, os = 0;                         // pixel strides of x and of out (all tasks' channels)
  std::vector<int32_t> table;                     // [rows, taps]: the input pixel, -1 in the padding
  int32_t source(int64_t r, int64_t q) const { return table[r * taps + q]; }
};

#ifdef METALEARN_FAST_SMALL_KERNELS
namespace avx2 {
METALEARN_FAST_BEGIN_AVX2
using namespace small;
#include "cpu/grouped_conv_impl.h"
METALEARN_FAST_END_AVX2
}  // namespace avx2

namespace avx512 {
METALEARN_FAST_BEGIN_AVX512
namespace small512 {
constexpr int kVectorBytes = 64;
#include "cpu/small_kernels_impl.h"
}  // namespace small512
using namespace small512;
#include "cpu/grouped_conv_impl.h"
METALEARN_FAST_END_AVX512
}  // namespace avx512
#endif

int64_t lanes_of(at::ScalarType dtype) {
#ifdef METALEARN_FAST_SMALL_KERNELS
  const bool wide = cpu_simd() == CpuSimd::kAvx512;
  if (dtype == at::kFloat) return wide ? avx512::lanes<float>() : avx2::lanes<float>();
  if (dtype == at::kDouble) return wide ? avx512::lanes<double>() : avx2::lanes<double>();
#endif
  return 0;
}

// Checks the arguments and returns the geometry of x and weight, and the output's size.
Geometry geometry(const char* op, const Tensor& x, const Tensor& weight, at::IntArrayRef stride,
                  at::IntArrayRef padding, int64_t groups, bool need_input, int64_t* out_h, int64_t* out_w) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), op, ": x and weight must be on the CPU, got ",
                    x.device(), " and ", weight.device());
  TORCH_CHECK_TYPE(x.scalar_type() == weight.scalar_type() && (x.scalar_type() == at::kFloat ||
                                                                 x.scalar_type() == at::kDouble),
                   op, ": x and weight must both be float32 or both float64, got ", x.scalar_type(), " and ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4 && weight.dim() == 4, op,
                    ": x must be [N, G*Cin, H, W] and weight [G*C, Cin, KH, KW], got shapes ", x.sizes(), " and ",
                    weight.sizes());
  TORCH_CHECK_VALUE(stride.size() == 2 && padding.size() == 2 && stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 &&
                        padding[1] >= 0,
                    op, ": stride must be two positive numbers and padding two non-negative ones, got ", stride,
                    " and ", padding);
  TORCH_CHECK_VALUE(groups > 0 && weight.size(0) % groups == 0 && x.size(1) == groups * weight.size(1), op,
                    ": weight [G*C, Cin, KH, KW] must have a multiple of groups = ", groups,
                    " rows and x G*Cin channels, got shapes ", weight.sizes(), " and ", x.sizes());
  Geometry geo;
  geo.cin = weight.size(1);
  geo.cout = weight.size(0) / groups;
  TORCH_CHECK_VALUE(grouped_conv_takes(x.scalar_type(), geo.cin, geo.cout, need_input), op,
                    ": takes input channels per group that are a multiple of ", lanes_of(x.scalar_type()),
                    need_input ? "" : " (or output channels that are)", " with the AVX2 or AVX-512 kernels on, got ",
                    geo.cin, " in and ", geo.cout, " out (cpu_simd ", cpu_simd_name(cpu_simd()), ")");
  const int64_t kh = weight.size(2), kw = weight.size(3);
  *out_h = (x.size(2) + 2 * padding[0] - kh) / stride[0] + 1;
  *out_w = (x.size(3) + 2 * padding[1] - kw) / stride[1] + 1;
  TORCH_CHECK_VALUE(x.size(0) > 0 && *out_h > 0 && *out_w > 0, op, ": the output would be empty, from x of shape ",
                    x.sizes(), " and a ", kh, "x", kw, " kernel");
  TORCH_CHECK_VALUE(x.numel() < INT32_MAX, op, ": x has more than 2^31 elements");
  geo.rows = x.size(0) * *out_h * *out_w;
  geo.taps = kh * kw;
  geo.xs = x.size(1);
  geo.os = weight.size(0);
  geo.table.resize(geo.rows * geo.taps);
  const int64_t h = x.size(2), w = x.size(3);
  int64_t r = 0;
  for (int64_t n = 0; n < x.size(0); ++n)
    for (int64_t oh = 0; oh < *out_h; ++oh)
      for (int64_t ow = 0; ow < *out_w; ++ow, ++r)
        for (int64_t i = 0; i < kh; ++i)
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t ih = oh * stride[0] - padding[0] + i, iw = ow * stride[1] - padding[1] + j;
            const bool inside = ih >= 0 && ih < h && iw >= 0 && iw < w;
            geo.table[r * geo.taps + i * kw + j] = inside ? static_cast<int32_t>((n * h + ih) * w + iw) : -1;
          }
  return geo;
}

Tensor channels_last(const Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

template <typename Kernel>
void per_task(int64_t groups, const Kernel& kernel) {
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) kernel(t);
  });
}

}  // namespace

bool grouped_conv_takes(at::ScalarType dtype, int64_t in_channels, int64_t out_channels, bool need_input) {
  const int64_t lanes = lanes_of(dtype);
  if (lanes == 0 || in_channels <= 0 || out_channels <= 0) return false;
  return in_channels % lanes == 0 || (!need_input && out_channels % lanes == 0);
}

Tensor grouped_conv(const Tensor& x_in, const Tensor& weight_in, const Tensor& bias_in, at::IntArrayRef stride,
                    at::IntArrayRef padding, int64_t groups) {
  int64_t out_h = 0, out_w = 0;
  const Geometry geo = geometry("grouped_conv", x_in, weight_in, stride, padding, groups, false, &out_h, &out_w);
  if (bias_in.defined()) {
    TORCH_CHECK_VALUE(bias_in.dim() == 1 && bias_in.size(0) == weight_in.size(0) &&
                          bias_in.scalar_type() == x_in.scalar_type() && bias_in.device().is_cpu(),
                      "grouped_conv: bias must be a CPU tensor [", weight_in.size(0), "] of x's dtype, got ",
                      bias_in.sizes(), " ", bias_in.scalar_type());
  }
  const Tensor x = channels_last(x_in), weight = channels_last(weight_in);
  const Tensor bias = bias_in.defined() ? bias_in.contiguous() : bias_in;
  Tensor out = at::empty({x.size(0), weight.size(0), out_h, out_w}, x.options(), at::MemoryFormat::ChannelsLast);
#ifdef METALEARN_FAST_SMALL_KERNELS
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_conv", [&] {
    const std::vector<scalar_t> zeros(geo.cin, scalar_t(0));
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool wide = cpu_simd() == CpuSimd::kAvx512;
    per_task(groups, [&](int64_t t) {
      const scalar_t* b = bp ? bp + t * geo.cout : nullptr;
      const scalar_t* w = wp + t * geo.cout * geo.taps * geo.cin;
      const auto forward = wide ? avx512::forward_one<scalar_t> : avx2::forward_one<scalar_t>;
      forward(geo, xp + t * geo.cin, w, b, zeros.data(), op + t * geo.cout);
    });
  });
#endif
  return out;
}

std::vector<Tensor> grouped_conv_backward(const Tensor& g_in, const Tensor& x_in, const Tensor& weight_in,
                                          at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups,
                                          bool need_input, bool need_weight, bool need_bias) {
  int64_t out_h = 0, out_w = 0;
  const Geometry geo = geometry("grouped_conv_backward", x_in, weight_in, stride, padding, groups, need_input, &out_h,
                                 &out_w);
  TORCH_CHECK_VALUE(g_in.dim() == 4 && g_in.size(0) == x_in.size(0) && g_in.size(1) == weight_in.size(0) &&
                        g_in.size(2) == out_h && g_in.size(3) == out_w,
                    "grouped_conv_backward: g must have the output's shape [", x_in.size(0), ", ", weight_in.size(0),
                    ", ", out_h, ", ", out_w, "], got ", g_in.sizes());
  TORCH_CHECK_TYPE(g_in.scalar_type() == x_in.scalar_type() && g_in.device().is_cpu(),
                   "grouped_conv_backward: g must be a CPU tensor of x's dtype, got ", g_in.scalar_type(), " on ",
                   g_in.device());
  const Tensor g = channels_last(g_in), x = channels_last(x_in), weight = channels_last(weight_in);
  Tensor g_x, g_w, g_b;
  if (need_input) g_x = at::zeros_like(x, at::MemoryFormat::ChannelsLast);
  if (need_weight) g_w = at::empty_like(weight, at::MemoryFormat::ChannelsLast);
  if (need_bias) g_b = at::empty({weight.size(0)}, weight.options());
#ifdef METALEARN_FAST_SMALL_KERNELS
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "grouped_conv_backward", [&] {
    const scalar_t *gp = g.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    const bool wide = cpu_simd() == CpuSimd::kAvx512;
    const int64_t weights = geo.cout * geo.taps * geo.cin;  // a task's
    per_task(groups, [&](int64_t t) {
      const scalar_t* gt = gp + t * geo.cout;
      scalar_t* g_xt = need_input ? g_x.data_ptr<scalar_t>() + t * geo.cin : nullptr;
      scalar_t* g_wt = need_weight ? g_w.data_ptr<scalar_t>() + t * weights : nullptr;
      const auto backward = wide ? avx512::backward_one<scalar_t> : avx2::backward_one<scalar_t>;
      backward(geo, gt, xp + t * geo.cin, wp + t * weights, g_xt, g_wt);
      if (need_bias) {
        scalar_t* dst = g_b.data_ptr<scalar_t>() + t * geo.cout;
        for (int64_t co = 0; co < geo.cout; ++co) dst[co] = 0;
        for (int64_t r = 0; r < geo.rows; ++r)
          for (int64_t co = 0; co < geo.cout; ++co) dst[co] += gt[r * geo.os + co];
      }
    });
  });
#endif
  return {g_x, g_w, g_b};
}

}  // namespace metalearn_fast
