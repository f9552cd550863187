// mlp_loss_grad on the CPU: one task's loss gradient of a small MLP, and the Hessian-vector product its
// backward needs, in the hand-written loops of small_kernels.h.
//
// The composite (composite/maml_mlp.cpp) takes some forty ATen calls for a gradient of the sinusoid's
// 1-40-40-1 network on 10 points, ~40 us of dispatch around ~2 us of arithmetic; a learn2learn-style loop
// takes one per inner step and one Hessian product per step in its backward. Here each is one pass over
// an L1-sized workspace. Larger layers, other dtypes and CPUs without AVX2 take the composite.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <deque>
#include <vector>

#include "composite/maml_mlp.h"
#include "cpu/small_kernels.h"

namespace metalearn_fast {
namespace {

#ifdef METALEARN_FAST_SMALL_KERNELS
METALEARN_FAST_BEGIN_AVX2
using namespace small;

// A task's forward and backward pass through the MLP, kept for the Hessian-vector product.
template <typename T>
class TaskPass {
 public:
  TaskPass(at::TensorList params, const at::Tensor& x, const at::Tensor& y, LossKind kind)
      : kind_(kind), layers_(static_cast<int64_t>(params.size() / 2)), rows_(x.size(0)) {
    for (int64_t l = 0; l < layers_; ++l) {
      weight_.push_back(params[2 * l].contiguous());
      bias_.push_back(params[2 * l + 1].contiguous());
      out_.push_back(weight_[l].size(0));
      in_.push_back(weight_[l].size(1));
      weight_t_.emplace_back(in_[l] * out_[l]);
      transpose(weight_t_[l].data(), weight_[l].const_data_ptr<T>(), out_[l], in_[l]);
    }
    x_ = x.contiguous();
    y_ = y.contiguous();
    forward_backward();
  }

  // One gradient per param [W0, b0, ...], new tensors like the params.
  std::vector<at::Tensor> gradients() const {
    std::vector<at::Tensor> grads;
    for (int64_t l = 0; l < layers_; ++l) {
      at::Tensor gw = at::empty_like(weight_[l]), gb = at::empty_like(bias_[l]);
      mm_tn(gw.mutable_data_ptr<T>(), deltas_[l].data(), input(l), rows_, out_[l], in_[l], Start::kZero);
      column_sums(gb.mutable_data_ptr<T>(), deltas_[l].data(), rows_, out_[l], Start::kZero);
      grads.push_back(gw);
      grads.push_back(gb);
    }
    return grads;
  }

  // H v for v [vW0, vb0, ...] (undefined: zero): a forward tangent pass, then its backward pass.
  std::vector<at::Tensor> hessian_times(at::TensorList direction) const {
    const int64_t L = layers_, R = rows_;
    std::vector<std::vector<T>> tangent(L);  // R a_l for l >= 1 (R a_0 = 0)
    std::vector<T> rz, vwt, zeros;
    std::vector<const T*> vw(L), vb(L);
    for (int64_t l = 0; l < L; ++l) {
      zeros.resize(std::max<size_t>(zeros.size(), in_[l] * out_[l]), T(0));
    }
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& w = direction[2 * l];
      const at::Tensor& b = direction[2 * l + 1];
      vw[l] = w.defined() ? keep(w).template const_data_ptr<T>() : zeros.data();
      vb[l] = b.defined() ? keep(b).template const_data_ptr<T>() : zeros.data();
    }
    for (int64_t l = 0; l < L; ++l) {
      vwt.resize(in_[l] * out_[l]);
      transpose(vwt.data(), vw[l], out_[l], in_[l]);
      rz.assign(R * out_[l], T(0));
      mm(rz.data(), input(l), vwt.data(), R, in_[l], out_[l], Start::kRow, vb[l]);
      if (l > 0) mm(rz.data(), tangent[l].data(), weight_t_[l].data(), R, in_[l], out_[l], Start::kKeep);
      if (l + 1 < L) {
        mask(rz.data(), inputs_[l + 1].data(), R * out_[l]);
        tangent[l + 1] = rz;
      }
    }
    std::vector<T> rd(R * out_[L - 1]), re;
    loss_hessian_times(kind_, rz.data(), probs_.data(), R, out_[L - 1], rd.data());
    std::vector<at::Tensor> result(2 * L);
    for (int64_t l = L - 1; l >= 0; --l) {
      at::Tensor hw = at::empty_like(weight_[l]), hb = at::empty_like(bias_[l]);
      T* hw_data = hw.mutable_data_ptr<T>();
      mm_tn(hw_data, rd.data(), input(l), R, out_[l], in_[l], Start::kZero);
      if (l > 0) mm_tn(hw_data, deltas_[l].data(), tangent[l].data(), R, out_[l], in_[l], Start::kKeep);
      column_sums(hb.mutable_data_ptr<T>(), rd.data(), R, out_[l], Start::kZero);
      result[2 * l] = hw;
      result[2 * l + 1] = hb;
      if (l > 0) {
        re.assign(R * in_[l], T(0));
        mm(re.data(), rd.data(), weight_[l].const_data_ptr<T>(), R, out_[l], in_[l], Start::kZero);
        mm(re.data(), deltas_[l].data(), vw[l], R, out_[l], in_[l], Start::kKeep);
        mask(re.data(), inputs_[l].data(), R * in_[l]);
        rd.swap(re);
      }
    }
    return result;
  }

 private:
  const T* input(int64_t l) const { return l == 0 ? x_.const_data_ptr<T>() : inputs_[l].data(); }

  const at::Tensor& keep(const at::Tensor& t) const { return kept_.emplace_back(t.contiguous()); }

  void forward_backward() {
    const int64_t L = layers_, R = rows_, C = out_[L - 1];
    inputs_.resize(L);
    deltas_.resize(L);
    std::vector<T> z;
    for (int64_t l = 0; l < L; ++l) {
      z.assign(R * out_[l], T(0));
      mm(z.data(), input(l), weight_t_[l].data(), R, in_[l], out_[l], Start::kRow, bias_[l].const_data_ptr<T>());
      if (l + 1 < L) {
        relu(z.data(), R * out_[l]);
        inputs_[l + 1] = z;
      }
    }
    probs_.assign(R * C, T(0));
    deltas_[L - 1].assign(R * C, T(0));
    const bool mse = kind_ == LossKind::kMse;
    loss_and_grad(kind_, z.data(), mse ? y_.const_data_ptr<T>() : nullptr,
                  mse ? nullptr : y_.const_data_ptr<int64_t>(), R, C, 1.0, deltas_[L - 1].data(), probs_.data());
    for (int64_t l = L - 1; l > 0; --l) {
      deltas_[l - 1].assign(R * in_[l], T(0));
      mm(deltas_[l - 1].data(), deltas_[l].data(), weight_[l].const_data_ptr<T>(), R, out_[l], in_[l], Start::kZero);
      mask(deltas_[l - 1].data(), inputs_[l].data(), R * in_[l]);
    }
  }

  LossKind kind_;
  int64_t layers_, rows_;
  std::vector<at::Tensor> weight_, bias_;
  std::vector<int64_t> in_, out_;
  std::vector<std::vector<T>> weight_t_, inputs_, deltas_;  // W_l^T; a_l (l >= 1); d_l = dLoss/dz_l
  std::vector<T> probs_;
  at::Tensor x_, y_;
  mutable std::deque<at::Tensor> kept_;  // contiguous copies whose pointers are in use
};

METALEARN_FAST_END_AVX2

bool takes_small_kernel(at::TensorList params, const at::Tensor& x) {
  if (!cpu_has_avx2_fma() || !x.is_cpu()) return false;
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  for (size_t i = 0; i < params.size(); i += 2) {
    if (params[i].numel() > kMaxSmallLayer) return false;
  }
  return true;
}
#endif  // METALEARN_FAST_SMALL_KERNELS

std::vector<at::Tensor> mlp_loss_grad_cpu(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                          c10::string_view loss) {
  const LossKind kind = check_mlp_loss_grad_args(params, x, y, loss);
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (takes_small_kernel(params, x)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_loss_grad_cpu", [&] {
      return TaskPass<scalar_t>(params, x, y, kind).gradients();
    });
  }
#endif
  return mlp_loss_grad_aten(params, x, y, kind);
}

std::vector<at::Tensor> mlp_loss_hessian_times_cpu(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                                   c10::string_view loss,
                                                   const c10::List<std::optional<at::Tensor>>& direction_in) {
  const LossKind kind = check_mlp_loss_grad_args(params, x, y, loss);
  const std::vector<at::Tensor> direction = optional_tensors(direction_in);
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (takes_small_kernel(params, x)) {
    return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "mlp_loss_hessian_times_cpu", [&] {
      return TaskPass<scalar_t>(params, x, y, kind).hessian_times(direction);
    });
  }
#endif
  return mlp_loss_hessian_times(params, x, y, kind, direction);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad_cpu);
  m.impl("mlp_loss_hessian_times", &mlp_loss_hessian_times_cpu);
}

}  // namespace metalearn_fast
