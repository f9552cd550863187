// BatchNorm (batch statistics) + ReLU of conv/BatchNorm/ReLU blocks as MAML's hand-derived meta-gradient runs
// them (metalearn_fast/algorithms/convnet.py, whose torch formulas are these kernels' fallback and oracle): the
// forward pass, its backward pass and the two halves of a Hessian-vector product, each in two or three passes
// over a layer's feature maps instead of several torch ops: per-channel sums first, then the outputs. Feature
// maps are channels-last [N, C, H, W] (in memory [M, C], M = N*H*W, C = tasks*channels); per-channel vectors
// are [C]. Sums run per fixed block of rows, then over the blocks in double, in order: the same numbers on any
// number of threads.
#include "norm_relu_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace metalearn_fast {
namespace {

constexpr int64_t kRows = 128;  // rows per block of the sums

// K sums per channel of row_terms(m, sums) over the rows: per block of kRows rows in T (into a zeroed sums
// [K, channels]), then the blocks' sums in double, in order.
template <int K, typename T, typename Terms>
std::vector<double> channel_sums(int64_t rows, int64_t channels, const Terms& row_terms) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
  std::vector<T> partial(blocks * K * channels, T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      T* sums = partial.data() + b * K * channels;
      for (int64_t m = b * kRows; m < std::min(rows, (b + 1) * kRows); ++m) row_terms(m, sums);
    }
  });
  std::vector<double> total(K * channels, 0.0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t i = 0; i < K * channels; ++i) total[i] += partial[b * K * channels + i];
  return total;
}

// value where the ReLU's output a is positive, else 0, in integer operations (a float comparison may trap, so
// the compiler would not vectorize a select on it): a positive float's bits are a positive integer, -0's a
// negative one
template <typename To, typename From>
inline To bits_as(From value) {  // std::bit_cast, which C++17 (torch 2.10's extensions) lacks
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &value, sizeof(To));
  return out;
}

template <typename T>
inline T relu_mask(T a, T value) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const I keep = -static_cast<I>(bits_as<I>(a) > 0);
  return bits_as<T>(static_cast<I>(bits_as<I>(value) & keep));
}

template <typename T>
const T* data(const at::Tensor& t) {
  return t.data_ptr<T>();
}

void check(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like, bool map) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have dtype ", like.scalar_type(),
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  if (map) {
    TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ",
                      t.sizes());
  } else {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == like.size(1), op, ": ", name, " must be [", like.size(1),
                      "] (one value per channel), got shape ", t.sizes());
  }
}

// Feature maps as [M, C] rows (channels-last, made so if they are not) and per-channel vectors contiguous.
std::vector<at::Tensor> prepared(const char* op, const std::vector<std::pair<const char*, at::Tensor>>& maps,
                                 const std::vector<std::pair<const char*, at::Tensor>>& vectors) {
  const at::Tensor& like = maps[0].second;
  TORCH_CHECK_TYPE(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble, op, ": ", maps[0].first,
                   " must be float32 or float64, got ", like.scalar_type());
  TORCH_CHECK_VALUE(like.dim() == 4, op, ": ", maps[0].first, " must be [N, C, H, W], got shape ", like.sizes());
  std::vector<at::Tensor> out;
  for (const auto& [name, t] : maps) {
    check(op, name, t, like, true);
    out.push_back(t.contiguous(at::MemoryFormat::ChannelsLast));
  }
  for (const auto& [name, t] : vectors) {
    check(op, name, t, like, false);
    out.push_back(t.contiguous());
  }
  return out;
}

template <typename T>
void tangent_forward(int64_t M, int64_t C, const T* __restrict dz, const T* __restrict xhat, const T* __restrict a,
                     const T* __restrict invstd, const T* __restrict gamma, const T* __restrict d_gamma,
                     const T* __restrict d_beta, T* __restrict d_xhat, T* __restrict d_a, T* __restrict d_scale) {
  const std::vector<double> sums = channel_sums<2, T>(M, C, [&](int64_t m, T* __restrict s) {
    const T* __restrict dz_m = dz + m * C;
    const T* __restrict x_m = xhat + m * C;
    T* __restrict s1 = s + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      s[c] += dz_m[c];
      s1[c] += x_m[c] * dz_m[c];
    }
  });
  // d_xhat = invstd * (dz - mean(dz) - xhat * mean(xhat dz)) = p1 dz + p0 + p2 xhat
  std::vector<T> p0(C), p1(C), p2(C);
  for (int64_t c = 0; c < C; ++c) {
    const double d_std = sums[C + c] / M;  // the std's derivative
    p1[c] = invstd[c];
    p0[c] = static_cast<T>(-invstd[c] * (sums[c] / M));
    p2[c] = static_cast<T>(-invstd[c] * d_std);
    d_scale[c] = static_cast<T>(d_std * invstd[c]);
  }
  const T *__restrict q0 = p0.data(), *__restrict q1 = p1.data(), *__restrict q2 = p2.data();
  at::parallel_for(0, M, kRows, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T *__restrict dz_m = dz + m * C, *__restrict x_m = xhat + m * C, *__restrict a_m = a + m * C;
      T *__restrict dx_m = d_xhat + m * C, *__restrict da_m = d_a + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T dx = q1[c] * dz_m[c] + q0[c] + q2[c] * x_m[c];
        const T dy = x_m[c] * d_gamma[c] + gamma[c] * dx + d_beta[c];
        dx_m[c] = dx;
        da_m[c] = relu_mask(a_m[c], dy);
      }
    }
  });
}

template <typename T>
void tangent_backward(int64_t M, int64_t C, const T* __restrict dg_a, const T* __restrict a, const T* __restrict xhat,
                      const T* __restrict d_xhat, const T* __restrict g_y, const T* __restrict invstd,
                      const T* __restrict gamma, const T* __restrict d_gamma, const T* __restrict d_scale,
                      const T* __restrict g_gamma, const T* __restrict g_beta, T* __restrict dg_z, T* __restrict g_z,
                      T* __restrict dg_gamma, T* __restrict dg_beta) {
  // dg_y = dg_a where a > 0; sums: dg_y, dg_y xhat, g_y d_xhat
  const std::vector<double> sums = channel_sums<3, T>(M, C, [&](int64_t m, T* __restrict s) {
    const T *__restrict g_m = dg_a + m * C, *__restrict a_m = a + m * C, *__restrict x_m = xhat + m * C;
    const T *__restrict dx_m = d_xhat + m * C, *__restrict gy_m = g_y + m * C;
    T *__restrict s1 = s + C, *__restrict s2 = s + 2 * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T dg_y = relu_mask(a_m[c], g_m[c]);
      s[c] += dg_y;
      s1[c] += dg_y * x_m[c];
      s2[c] += gy_m[c] * dx_m[c];
    }
  });
  // with unit = invstd (g_y - mean(g_y) - xhat mean(g_y xhat)) = invstd g_y + u0 + u1 xhat (g_z = gamma unit):
  // dg_z = gamma invstd (dg_y - mean(dg_y) - xhat mean(dg_y xhat)) + d_gamma unit - gamma unit d_scale
  //        - gamma invstd (d_xhat mean(g_y xhat) + xhat mean(g_y d_xhat))
  //      = k1 dg_y + k0 + k2 xhat + k3 g_y + k4 d_xhat
  // and g_z = gamma unit = k1 g_y + z0 + k4 xhat
  std::vector<T> k0(C), k1(C), k2(C), k3(C), k4(C), z0(C);
  for (int64_t c = 0; c < C; ++c) {
    const double scale = static_cast<double>(gamma[c]) * invstd[c], on_unit = d_gamma[c] - gamma[c] * d_scale[c];
    const double u0 = -invstd[c] * (static_cast<double>(g_beta[c]) / M);
    const double u1 = -invstd[c] * (static_cast<double>(g_gamma[c]) / M);
    k1[c] = static_cast<T>(scale);
    k0[c] = static_cast<T>(-scale * (sums[c] / M) + on_unit * u0);
    k2[c] = static_cast<T>(-scale * ((sums[C + c] + sums[2 * C + c]) / M) + on_unit * u1);
    k3[c] = static_cast<T>(on_unit * invstd[c]);
    k4[c] = static_cast<T>(-scale * (static_cast<double>(g_gamma[c]) / M));
    z0[c] = static_cast<T>(gamma[c] * u0);
    dg_gamma[c] = static_cast<T>(sums[C + c] + sums[2 * C + c]);
    dg_beta[c] = static_cast<T>(sums[c]);
  }
  const T *__restrict c0 = k0.data(), *__restrict c1 = k1.data(), *__restrict c2 = k2.data();
  const T *__restrict c3 = k3.data(), *__restrict c4 = k4.data();
  const T* __restrict e0 = z0.data();
  at::parallel_for(0, M, kRows, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T *__restrict g_m = dg_a + m * C, *__restrict a_m = a + m * C, *__restrict x_m = xhat + m * C;
      const T *__restrict dx_m = d_xhat + m * C, *__restrict gy_m = g_y + m * C;
      T* __restrict out = dg_z + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T dg_y = relu_mask(a_m[c], g_m[c]);
        out[c] = c1[c] * dg_y + c0[c] + c2[c] * x_m[c] + c3[c] * gy_m[c] + c4[c] * dx_m[c];
      }
      if (g_z != nullptr) {
        T* __restrict gz_m = g_z + m * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gz_m[c] = c1[c] * gy_m[c] + e0[c] + c4[c] * x_m[c];
      }
    }
  });
}

template <typename T>
void forward(int64_t M, int64_t C, const T* __restrict z, const T* __restrict gamma, const T* __restrict beta,
             double eps, T* __restrict xhat, T* __restrict a, T* __restrict invstd) {
  // two passes for the statistics (the mean, then the squares about it: no cancellation), one for the outputs
  const std::vector<double> sums = channel_sums<1, T>(M, C, [&](int64_t m, T* __restrict s) {
    const T* __restrict z_m = z + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) s[c] += z_m[c];
  });
  std::vector<T> mu(C);
  for (int64_t c = 0; c < C; ++c) mu[c] = static_cast<T>(sums[c] / M);
  const T* __restrict u = mu.data();
  const std::vector<double> squares = channel_sums<1, T>(M, C, [&](int64_t m, T* __restrict s) {
    const T* __restrict z_m = z + m * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) s[c] += (z_m[c] - u[c]) * (z_m[c] - u[c]);
  });
  for (int64_t c = 0; c < C; ++c) invstd[c] = static_cast<T>(1.0 / std::sqrt(squares[c] / M + eps));
  at::parallel_for(0, M, kRows, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T* __restrict z_m = z + m * C;
      T *__restrict x_m = xhat + m * C, *__restrict a_m = a + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const T x = (z_m[c] - u[c]) * invstd[c];
        const T y = gamma[c] * x + beta[c];
        x_m[c] = x;
        a_m[c] = relu_mask(y, y);
      }
    }
  });
}

template <typename T>
// g_z may be g_a (each element is read before it is written)
void backward(int64_t M, int64_t C, const T* g_a, const T* __restrict a, const T* __restrict xhat,
              const T* __restrict invstd, const T* __restrict gamma, T* __restrict g_y, T* g_z,
              T* __restrict g_gamma, T* __restrict g_beta) {
  const std::vector<double> sums = channel_sums<2, T>(M, C, [&](int64_t m, T* __restrict s) {
    const T *__restrict g_m = g_a + m * C, *__restrict a_m = a + m * C, *__restrict x_m = xhat + m * C;
    T* __restrict s1 = s + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T gy = relu_mask(a_m[c], g_m[c]);
      s[c] += gy;
      s1[c] += gy * x_m[c];
    }
  });
  // g_z = gamma unit, unit = invstd (g_y - mean(g_y) - xhat mean(g_y xhat)): g_z = k2 g_y + k0 + k1 xhat
  std::vector<T> k0(C), k1(C), k2(C);
  for (int64_t c = 0; c < C; ++c) {
    k0[c] = static_cast<T>(-gamma[c] * invstd[c] * (sums[c] / M));
    k1[c] = static_cast<T>(-gamma[c] * invstd[c] * (sums[C + c] / M));
    k2[c] = static_cast<T>(gamma[c] * invstd[c]);
    g_beta[c] = static_cast<T>(sums[c]);
    g_gamma[c] = static_cast<T>(sums[C + c]);
  }
  const T *__restrict c0 = k0.data(), *__restrict c1 = k1.data(), *__restrict c2 = k2.data();
  at::parallel_for(0, M, kRows, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const T *g_m = g_a + m * C, *__restrict a_m = a + m * C, *__restrict x_m = xhat + m * C;
      T* gz_m = g_z + m * C;
      if (g_y != nullptr) {  // (before g_z, which may overwrite g_a)
        T* __restrict gy_m = g_y + m * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gy_m[c] = relu_mask(a_m[c], g_m[c]);
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) gz_m[c] = c2[c] * relu_mask(a_m[c], g_m[c]) + c0[c] + c1[c] * x_m[c];
    }
  });
}

}  // namespace

std::vector<at::Tensor> norm_relu_tangent(const at::Tensor& dz, const at::Tensor& xhat, const at::Tensor& a,
                                          const at::Tensor& invstd, const at::Tensor& gamma,
                                          const at::Tensor& d_gamma, const at::Tensor& d_beta) {
  const char* op = "norm_relu_tangent";
  const auto t = prepared(op, {{"dz", dz}, {"xhat", xhat}, {"a", a}},
                          {{"invstd", invstd}, {"gamma", gamma}, {"d_gamma", d_gamma}, {"d_beta", d_beta}});
  const int64_t C = dz.size(1), M = dz.numel() / std::max<int64_t>(C, 1);
  at::Tensor d_xhat = at::empty_like(t[0]), d_a = at::empty_like(t[0]), d_scale = at::empty({C}, t[3].options());
  AT_DISPATCH_FLOATING_TYPES(dz.scalar_type(), "norm_relu_tangent", [&] {
    tangent_forward<scalar_t>(M, C, data<scalar_t>(t[0]), data<scalar_t>(t[1]), data<scalar_t>(t[2]),
                              data<scalar_t>(t[3]), data<scalar_t>(t[4]), data<scalar_t>(t[5]), data<scalar_t>(t[6]),
                              d_xhat.data_ptr<scalar_t>(), d_a.data_ptr<scalar_t>(), d_scale.data_ptr<scalar_t>());
  });
  return {d_xhat, d_a, d_scale};
}

std::vector<at::Tensor> norm_relu_tangent_backward(const at::Tensor& dg_a, const at::Tensor& a, const at::Tensor& xhat,
                                                   const at::Tensor& d_xhat, const at::Tensor& g_y,
                                                   const at::Tensor& invstd, const at::Tensor& gamma,
                                                   const at::Tensor& d_gamma, const at::Tensor& d_scale,
                                                   const at::Tensor& g_gamma, const at::Tensor& g_beta, bool with_g_z) {
  const char* op = "norm_relu_tangent_backward";
  const auto t = prepared(op, {{"dg_a", dg_a}, {"a", a}, {"xhat", xhat}, {"d_xhat", d_xhat}, {"g_y", g_y}},
                          {{"invstd", invstd}, {"gamma", gamma}, {"d_gamma", d_gamma}, {"d_scale", d_scale},
                           {"g_gamma", g_gamma}, {"g_beta", g_beta}});
  const int64_t C = dg_a.size(1), M = dg_a.numel() / std::max<int64_t>(C, 1);
  at::Tensor dg_z = at::empty_like(t[0]), g_z = with_g_z ? at::empty_like(t[0]) : at::Tensor();
  at::Tensor dg_gamma = at::empty({C}, t[5].options()), dg_beta = at::empty({C}, t[5].options());
  AT_DISPATCH_FLOATING_TYPES(dg_a.scalar_type(), "norm_relu_tangent_backward", [&] {
    tangent_backward<scalar_t>(M, C, data<scalar_t>(t[0]), data<scalar_t>(t[1]), data<scalar_t>(t[2]),
                               data<scalar_t>(t[3]), data<scalar_t>(t[4]), data<scalar_t>(t[5]), data<scalar_t>(t[6]),
                               data<scalar_t>(t[7]), data<scalar_t>(t[8]), data<scalar_t>(t[9]),
                               data<scalar_t>(t[10]), dg_z.data_ptr<scalar_t>(),
                               with_g_z ? g_z.data_ptr<scalar_t>() : nullptr, dg_gamma.data_ptr<scalar_t>(),
                               dg_beta.data_ptr<scalar_t>());
  });
  return {dg_z, g_z, dg_gamma, dg_beta};
}

std::vector<at::Tensor> norm_relu(const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& beta, double eps) {
  const char* op = "norm_relu";
  const auto t = prepared(op, {{"z", z}}, {{"gamma", gamma}, {"beta", beta}});
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const int64_t C = z.size(1), M = z.numel() / std::max<int64_t>(C, 1);
  at::Tensor xhat = at::empty_like(t[0]), a = at::empty_like(t[0]);
  at::Tensor invstd = at::empty({C}, t[1].options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "norm_relu", [&] {
    forward<scalar_t>(M, C, data<scalar_t>(t[0]), data<scalar_t>(t[1]), data<scalar_t>(t[2]), eps,
                      xhat.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), invstd.data_ptr<scalar_t>());
  });
  return {xhat, a, invstd};
}

std::vector<at::Tensor> norm_relu_backward(const at::Tensor& g_a, const at::Tensor& a, const at::Tensor& xhat,
                                           const at::Tensor& invstd, const at::Tensor& gamma, bool with_g_y) {
  const char* op = "norm_relu_backward";
  const auto t = prepared(op, {{"g_a", g_a}, {"a", a}, {"xhat", xhat}}, {{"invstd", invstd}, {"gamma", gamma}});
  const int64_t C = g_a.size(1), M = g_a.numel() / std::max<int64_t>(C, 1);
  // g_z in g_a's memory (t[0] is g_a itself where g_a is channels-last already): the caller's g_a is used up
  at::Tensor g_y = with_g_y ? at::empty_like(t[1]) : at::Tensor(), g_z = t[0];
  at::Tensor g_gamma = at::empty({C}, t[3].options()), g_beta = at::empty({C}, t[3].options());
  AT_DISPATCH_FLOATING_TYPES(g_a.scalar_type(), "norm_relu_backward", [&] {
    backward<scalar_t>(M, C, data<scalar_t>(t[0]), data<scalar_t>(t[1]), data<scalar_t>(t[2]), data<scalar_t>(t[3]),
                       data<scalar_t>(t[4]), with_g_y ? g_y.data_ptr<scalar_t>() : nullptr,
                       g_z.data_ptr<scalar_t>(), g_gamma.data_ptr<scalar_t>(), g_beta.data_ptr<scalar_t>());
  });
  return {g_y, g_z, g_gamma, g_beta};
}

}  // namespace metalearn_fast
