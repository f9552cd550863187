// maml_mlp_meta_grad on the CPU: small MLPs one task at a time, in loops written here.
//
// The composite kernel (composite/maml_mlp.cpp) runs a meta-batch as about a hundred batched ATen
// calls. With small layers (the sinusoid's 40x40) each call's arithmetic takes a microsecond or
// two, and dispatch, allocation and a pass over memory cost as much again. Here a thread takes its
// tasks one by one and runs each task's whole meta-step (inner loop, query pass, reverse sweep with
// Hessian-vector products) in a workspace of a few kilobytes that stays in the core's L1 cache,
// with no ATen call between the first and the last. The algorithm and its notation are the
// composite's (see there): a_l the input of layer l, z_l = a_l W_l^T + b_l, d_l = dLoss/dz_l, v the
// per-task gradient carried back by the reverse sweep v_s = v_{s+1} - H_s (lr * v_{s+1}).
//
// Each thread sums its tasks' shares of the loss and gradients; the shares are added in a fixed
// order, so results do not depend on scheduling. The loops are compiled for AVX2 and FMA, used
// when the CPU has them (checked at run time). Larger layers, where the composite's batched GEMMs
// share the weights across tasks, other dtypes, and CPUs without AVX2 take the composite.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "composite/maml_mlp.h"
#include "cpu/small_kernels.h"

namespace metalearn_fast {
namespace {

using at::Tensor;

#ifdef METALEARN_FAST_SMALL_KERNELS
// Everything from here to the matching END is compiled for AVX2 + FMA and runs only on CPUs that
// have them. Its loops work on raw pointers and call no ATen code (run_tasks only hands ranges of
// tasks to at::parallel_for).
METALEARN_FAST_BEGIN_AVX2
using namespace small;

// The shared, read-only description of one call.
template <typename T>
struct Problem {
  int64_t layers, steps, first_adapted, support, query, total_tasks;
  LossKind kind;
  bool first_order, compute_grad, compute_lr_grad;
  // Reptile: the share of a task is its step-0 support loss and its adapted weights, each over total_tasks
  bool reptile = false;
  std::vector<int64_t> in, out;                // per layer
  std::vector<const T*> weight, weight_t, bias;  // the meta-parameters; weight_t: W^T [I,O]
  std::vector<const T*> rate;                   // per param: its learning rate (at step 0)
  std::vector<char> rate_per_element;           // per param: rate shaped like it, or one number
  int64_t rate_step_stride = 0;                 // 1 when each inner step has its own rate (per_step_lr)
  std::vector<double> weights;                  // per step: the weight of the query loss after it
  std::vector<size_t> rate_slot;                // per param: which lr tensor (for the rates' gradient)
  const T *x_support, *x_query;
  const T *y_support, *y_query;                // mse targets
  const int64_t *label_support, *label_query;  // cross-entropy labels
};

// What a thread accumulates over its tasks.
template <typename T>
struct Share {
  double loss = 0;
  std::vector<std::vector<T>> grads;     // per param
  std::vector<std::vector<T>> lr_grads;  // per lr tensor
};
// One thread's workspace and the meta-step of one task at a time.
template <typename T>
class TaskKernel {
 public:
  explicit TaskKernel(const Problem<T>& p) : p_(p) {
    const int64_t L = p.layers, S = p.steps, K = p.support, Q = p.query, fa = p.first_adapted;
    int64_t widest = 0, largest = 0;
    for (int64_t l = 0; l < L; ++l) {
      widest = std::max({widest, p.in[l], p.out[l]});
      largest = std::max(largest, p.in[l] * p.out[l]);
    }
    // sizes first, then one buffer carved into pieces
    std::vector<std::pair<T**, int64_t>> pieces;
    act_.assign(S * L, nullptr);
    delta_.assign(S * L, nullptr);
    probs_.assign(S, nullptr);
    w_.assign((S + 1) * L, nullptr);
    wt_.assign((S + 1) * L, nullptr);
    b_.assign((S + 1) * L, nullptr);
    g_.assign(S * L, nullptr);
    gb_.assign(S * L, nullptr);
    v_.assign(L, nullptr);
    vb_.assign(L, nullptr);
    u_.assign(L, nullptr);
    ut_.assign(L, nullptr);
    ub_.assign(L, nullptr);
    ra_.assign(L, nullptr);
    qact_.assign(L, nullptr);
    for (int64_t s = 0; s < S; ++s) {
      // the body's activations are the same at every step: step 0's serve all
      for (int64_t l = s == 0 ? 1 : fa + 1; l < L; ++l) pieces.push_back({&act_[s * L + l], K * p.in[l]});
      for (int64_t l = fa; l < L; ++l) {
        pieces.push_back({&delta_[s * L + l], K * p.out[l]});
        pieces.push_back({&g_[s * L + l], p.out[l] * p.in[l]});
        pieces.push_back({&gb_[s * L + l], p.out[l]});
        pieces.push_back({&w_[(s + 1) * L + l], p.out[l] * p.in[l]});
        pieces.push_back({&wt_[(s + 1) * L + l], p.out[l] * p.in[l]});
        pieces.push_back({&b_[(s + 1) * L + l], p.out[l]});
      }
      pieces.push_back({&probs_[s], K * p.out[L - 1]});
    }
    for (int64_t l = fa; l < L; ++l) {
      for (T** piece : {&v_[l], &u_[l], &ut_[l]}) pieces.push_back({piece, p.out[l] * p.in[l]});
      for (T** piece : {&vb_[l], &ub_[l]}) pieces.push_back({piece, p.out[l]});
      if (l > fa) pieces.push_back({&ra_[l], K * p.in[l]});
    }
    for (int64_t l = 1; l < L; ++l) pieces.push_back({&qact_[l], Q * p.in[l]});
    const int64_t rows = std::max(K, Q);
    for (T** piece : {&logits_, &query_probs_, &rz_, &rd_, &re_, &qd_, &qe_}) pieces.push_back({piece, rows * widest});
    pieces.push_back({&hw_, largest});
    pieces.push_back({&hb_, widest});
    int64_t total = 0;
    for (const auto& piece : pieces) total += piece.second;
    buffer_.assign(total, T(0));
    T* next = buffer_.data();
    for (const auto& [slot, size] : pieces) {
      *slot = next;
      next += size;
    }
    for (int64_t s = 1; s < S; ++s) {
      for (int64_t l = 1; l <= fa; ++l) act_[s * L + l] = act_[l];
    }
  }

  void run(int64_t task, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t K = p.support, Q = p.query, C = p.out[p.layers - 1];
    const bool mse = p.kind == LossKind::kMse;
    const Task t{p.x_support + task * K * p.in[0], p.x_query + task * Q * p.in[0],
                 mse ? p.y_support + task * K * C : nullptr, mse ? p.y_query + task * Q * C : nullptr,
                 mse ? nullptr : p.label_support + task * K, mse ? nullptr : p.label_query + task * Q};
    inner_loop(t, share);
    if (p.reptile) {
      const T share_of_task = static_cast<T>(1.0 / static_cast<double>(p.total_tasks));
      for (int64_t l = 0; l < p.layers; ++l) {
        add_scaled(share.grads[2 * l].data(), w_[p.steps * p.layers + l], share_of_task, p.out[l] * p.in[l]);
        add_scaled(share.grads[2 * l + 1].data(), b_[p.steps * p.layers + l], share_of_task, p.out[l]);
      }
      return;
    }
    // First order without rate gradients needs no sweep: the weighted query gradients add up.
    const bool sweep = !p.first_order || p.compute_lr_grad;
    if (!query_pass(t, p.steps, sweep, false, share) || !sweep) {
      for (int64_t s = p.steps - 1; s >= 1; --s) {
        if (p.weights[s - 1] != 0) query_pass(t, s, sweep, true, share);
      }
      return;
    }
    reverse_sweep(t, share);
    if (!p.compute_grad) return;
    for (int64_t l = p.first_adapted; l < p.layers; ++l) {
      add(share.grads[2 * l].data(), v_[l], p.out[l] * p.in[l]);
      add(share.grads[2 * l + 1].data(), vb_[l], p.out[l]);
    }
  }

 private:
  // One task's data in the meta-batch's arrays (targets for mse, labels for cross-entropy).
  struct Task {
    const T *xs, *xq, *ys, *yq;
    const int64_t *ls, *lq;
  };

  const T* input(const Task& t, int64_t s, int64_t l) const { return l == 0 ? t.xs : act_[s * p_.layers + l]; }

  // The support pass at each inner step, its gradient, and the SGD step to the next.
  void inner_loop(const Task& t, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, K = p.support, fa = p.first_adapted, C = p.out[L - 1];
    for (int64_t s = 0; s < p.steps; ++s) {
      for (int64_t l = s == 0 ? 0 : fa; l < L; ++l) {
        T* z = l + 1 < L ? act_[s * L + l + 1] : logits_;
        mm(z, input(t, s, l), weight_t(s, l), K, p.in[l], p.out[l], Start::kRow, bias(s, l));
        if (l + 1 < L) relu(z, K * p.out[l]);
      }
      const double loss = loss_and_grad(p.kind, logits_, t.ys, t.ls, K, C, 1.0, delta_[s * L + L - 1], probs_[s]);
      if (p.reptile && s == 0) share.loss += loss / static_cast<double>(p.total_tasks);
      for (int64_t l = L - 1; l >= fa; --l) {
        const T* d = delta_[s * L + l];
        mm_tn(g_[s * L + l], d, input(t, s, l), K, p.out[l], p.in[l], Start::kZero);
        column_sums(gb_[s * L + l], d, K, p.out[l], Start::kZero);
        if (l > fa) {
          mm(delta_[s * L + l - 1], d, weight(s, l), K, p.out[l], p.in[l], Start::kZero);
          mask(delta_[s * L + l - 1], act_[s * L + l], K * p.in[l]);
        }
      }
      for (int64_t l = fa; l < L; ++l) {
        times_rate(w_[(s + 1) * L + l], weight(s, l), g_[s * L + l], s, 2 * l, p.out[l] * p.in[l]);
        times_rate(b_[(s + 1) * L + l], bias(s, l), gb_[s * L + l], s, 2 * l + 1, p.out[l]);
        transpose(wt_[(s + 1) * L + l], w_[(s + 1) * L + l], p.out[l], p.in[l]);
      }
    }
  }

  // The query pass at inner step `step`'s weights, its weighted loss (the task's share of the mean) and its
  // gradient: per task into v for the adapted layers when the sweep follows (added to v when accumulate), summed
  // into the share otherwise. False when no gradient is wanted.
  bool query_pass(const Task& t, int64_t step, bool sweep, bool accumulate, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, S = step, Q = p.query, fa = p.first_adapted, C = p.out[L - 1];
    for (int64_t l = 0; l < L; ++l) {
      T* z = l + 1 < L ? qact_[l + 1] : logits_;
      mm(z, l == 0 ? t.xq : qact_[l], weight_t(S, l), Q, p.in[l], p.out[l], Start::kRow, bias(S, l));
      if (l + 1 < L) relu(z, Q * p.out[l]);
    }
    T* qd = qd_;
    T* qe = qe_;
    const double scale = p.weights[step - 1] / static_cast<double>(p.total_tasks);
    share.loss += loss_and_grad(p.kind, logits_, t.yq, t.lq, Q, C, scale, qd, query_probs_);
    if (!p.compute_grad && !p.compute_lr_grad) return false;
    const int64_t query_stop = p.compute_grad ? 0 : fa;
    for (int64_t l = L - 1; l >= query_stop; --l) {
      const T* a = l == 0 ? t.xq : qact_[l];
      const bool per_task = sweep && l >= fa;
      const Start start = per_task && !accumulate ? Start::kZero : Start::kKeep;
      mm_tn(per_task ? v_[l] : share.grads[2 * l].data(), qd, a, Q, p.out[l], p.in[l], start);
      column_sums(per_task ? vb_[l] : share.grads[2 * l + 1].data(), qd, Q, p.out[l], start);
      if (l > query_stop) {
        mm(qe, qd, weight(S, l), Q, p.out[l], p.in[l], Start::kZero);
        mask(qe, qact_[l], Q * p.in[l]);
        std::swap(qd, qe);
      }
    }
    return true;
  }

  // The reverse sweep over the inner steps: rate gradients, and v_s = v_{s+1} - H_s (lr * v_{s+1}) by a tangent
  // forward and backward pass (the body's share of H u goes straight into the share's gradients), plus the
  // weighted query gradient at step s's weights under a multi-step loss.
  void reverse_sweep(const Task& t, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, fa = p.first_adapted;
    for (int64_t s = p.steps - 1; s >= 0; --s) {
      if (p.compute_lr_grad) {
        // d lr -= g_s * v_{s+1}, summed to the rate's shape
        for (int64_t l = fa; l < L; ++l) {
          rate_grad(share, 2 * l, s, g_[s * L + l], v_[l], p.out[l] * p.in[l]);
          rate_grad(share, 2 * l + 1, s, gb_[s * L + l], vb_[l], p.out[l]);
        }
      }
      // the Hessian term at step 0 only feeds the parameters' gradient
      if (!p.first_order && (s > 0 || p.compute_grad)) hessian_step(t, s, share);
      if (s > 0 && p.weights[s - 1] != 0) query_pass(t, s, true, true, share);
    }
  }

  // v_s = v_{s+1} - H_s (lr * v_{s+1}), the body's share of H u into the share's gradients.
  void hessian_step(const Task& t, int64_t s, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, K = p.support, fa = p.first_adapted, C = p.out[L - 1];
    const int64_t hessian_stop = p.compute_grad ? 0 : fa;
    // direction u = lr * v on the adapted layers
    for (int64_t l = fa; l < L; ++l) {
      times_rate(u_[l], v_[l], nullptr, s, 2 * l, p.out[l] * p.in[l]);
      times_rate(ub_[l], vb_[l], nullptr, s, 2 * l + 1, p.out[l]);
      transpose(ut_[l], u_[l], p.out[l], p.in[l]);
    }
    // tangent forward: r z_l = a_l U_l^T + ub_l + r a_l W_l^T, r a_{l+1} = r z_l masked
    for (int64_t l = fa; l < L; ++l) {
      T* rz = l + 1 < L ? ra_[l + 1] : rz_;
      mm(rz, input(t, s, l), ut_[l], K, p.in[l], p.out[l], Start::kRow, ub_[l]);
      if (l > fa) mm(rz, ra_[l], weight_t(s, l), K, p.in[l], p.out[l], Start::kKeep);
      if (l + 1 < L) mask(rz, act_[s * L + l + 1], K * p.out[l]);
    }
    T* rd = rd_;
    T* re = re_;
    loss_hessian_times(p.kind, rz_, probs_[s], K, C, rd);
    // tangent backward: H u = (rd_l^T a_l + d_l^T r a_l, sum rd_l) per layer
    for (int64_t l = L - 1; l >= hessian_stop; --l) {
      mm_tn(hw_, rd, input(t, s, l), K, p.out[l], p.in[l], Start::kZero);
      if (l > fa) mm_tn(hw_, delta_[s * L + l], ra_[l], K, p.out[l], p.in[l], Start::kKeep);
      column_sums(hb_, rd, K, p.out[l], Start::kZero);
      const bool adapted = l >= fa;
      subtract(adapted ? v_[l] : share.grads[2 * l].data(), hw_, p.out[l] * p.in[l]);
      subtract(adapted ? vb_[l] : share.grads[2 * l + 1].data(), hb_, p.out[l]);
      if (l > hessian_stop) {
        mm(re, rd, weight(s, l), K, p.out[l], p.in[l], Start::kZero);
        if (adapted) mm(re, delta_[s * L + l], u_[l], K, p.out[l], p.in[l], Start::kKeep);
        mask(re, act_[s * L + l], K * p.in[l]);
        std::swap(rd, re);
      }
    }
  }

  // The layer's parameters at inner step s (step 0 and the body: the meta-parameters).
  bool own(int64_t s, int64_t l) const { return s > 0 && l >= p_.first_adapted; }
  const T* weight(int64_t s, int64_t l) const { return own(s, l) ? w_[s * p_.layers + l] : p_.weight[l]; }
  const T* weight_t(int64_t s, int64_t l) const { return own(s, l) ? wt_[s * p_.layers + l] : p_.weight_t[l]; }
  const T* bias(int64_t s, int64_t l) const { return own(s, l) ? b_[s * p_.layers + l] : p_.bias[l]; }

  // out = x - rate * g (the SGD step at inner step s), or out = rate * x (the direction of a Hessian product, g
  // null)
  void times_rate(T* __restrict out, const T* __restrict x, const T* __restrict g, int64_t s, int64_t param,
                  int64_t n) const {
    const T* rate = p_.rate[param] + s * p_.rate_step_stride;
    const int64_t stride = p_.rate_per_element[param] ? 1 : 0;
    if (g == nullptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = rate[i * stride] * x[i];
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = x[i] - rate[i * stride] * g[i];
    }
  }
  void rate_grad(Share<T>& share, int64_t param, int64_t s, const T* g, const T* v, int64_t n) const {
    T* out = share.lr_grads[p_.rate_slot[param]].data() + s * p_.rate_step_stride;
    if (p_.rate_per_element[param]) {
      for (int64_t i = 0; i < n; ++i) out[i] -= g[i] * v[i];
      return;
    }
    out[0] -= dot(g, v, n);
  }
  static void add(T* __restrict out, const T* __restrict x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] += x[i];
  }
  static void add_scaled(T* __restrict out, const T* __restrict x, T scale, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] += scale * x[i];
  }
  static void subtract(T* __restrict out, const T* __restrict x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] -= x[i];
  }

  const Problem<T>& p_;
  std::vector<T> buffer_;
  // [s * layers + l]; w_, wt_, b_ from step 1 on, for the adapted layers
  std::vector<T*> act_, delta_, g_, gb_, w_, wt_, b_;
  std::vector<T*> probs_;                       // per step
  std::vector<T*> v_, vb_, u_, ut_, ub_, ra_, qact_;  // per layer
  T *logits_ = nullptr, *query_probs_ = nullptr, *rz_ = nullptr, *rd_ = nullptr, *re_ = nullptr, *qd_ = nullptr,
    *qe_ = nullptr, *hw_ = nullptr, *hb_ = nullptr;
};

// Runs the tasks in contiguous ranges, one per thread, and adds up their shares.
template <typename T>
Share<T> run_tasks(const Problem<T>& p, int64_t tasks, at::TensorList params, at::TensorList lr) {
  auto empty_share = [&] {
    Share<T> share;
    for (const auto& t : params) share.grads.emplace_back(p.compute_grad ? t.numel() : 0, T(0));
    for (const auto& t : lr) share.lr_grads.emplace_back(p.compute_lr_grad ? t.numel() : 0, T(0));
    return share;
  };
  const int64_t ranges = std::min<int64_t>(tasks, at::get_num_threads());
  std::vector<Share<T>> shares(ranges);
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      shares[r] = empty_share();
      TaskKernel<T> kernel(p);
      for (int64_t t = r * tasks / ranges; t < (r + 1) * tasks / ranges; ++t) kernel.run(t, shares[r]);
    }
  });
  Share<T> total = std::move(shares[0]);
  for (int64_t r = 1; r < ranges; ++r) {
    total.loss += shares[r].loss;
    for (size_t i = 0; i < total.grads.size(); ++i) {
      for (size_t e = 0; e < total.grads[i].size(); ++e) total.grads[i][e] += shares[r].grads[i][e];
    }
    for (size_t i = 0; i < total.lr_grads.size(); ++i) {
      for (size_t e = 0; e < total.lr_grads[i].size(); ++e) total.lr_grads[i][e] += shares[r].lr_grads[i][e];
    }
  }
  return total;
}

METALEARN_FAST_END_AVX2

// Whether the per-task kernel takes this call: float or double, the learning rates as one number for all
// params or one tensor per param, and either small layers (a task's whole meta-step in L1/L2) or few
// examples per task, where the composite's batched GEMMs are so thin that their overhead dominates
// (the Omniglot-sized MLP, 5 rows a task, measured 2.2x faster here). Many rows through large layers
// (a 512x512 MLP with 64 rows a task) run faster as the composite's batched GEMMs.
constexpr int64_t kFewRows = 8;

bool takes_task_kernel(at::TensorList params, at::TensorList lr, const Tensor& x_support, const Tensor& x_query,
                       bool per_step_lr) {
  if (!cpu_has_avx2_fma()) return false;
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  bool small = true;
  for (size_t i = 0; i < params.size(); i += 2) small = small && params[i].numel() <= kMaxSmallLayer;
  if (!small && std::max(x_support.size(1), x_query.size(1)) > kFewRows) return false;
  return lr.size() == params.size() || lr[0].dim() == 0 || per_step_lr;
}

template <typename T>
MetaGrad task_kernel_meta_grad(at::TensorList params_in, at::TensorList lr_in, const Tensor& x_support,
                               const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                               int64_t inner_steps, bool first_order, LossKind kind, int64_t first_adapted,
                               bool compute_grad, bool compute_lr_grad, const Schedule& schedule,
                               bool reptile = false) {
  std::vector<Tensor> params, weight_t, lr;
  for (const auto& t : params_in) params.push_back(t.contiguous());
  for (const auto& t : lr_in) lr.push_back(t.contiguous());
  const Tensor xs = x_support.contiguous(), ys = y_support.contiguous();
  const Tensor xq = x_query.contiguous(), yq = y_query.contiguous();
  const int64_t layers = static_cast<int64_t>(params.size() / 2), tasks = xs.size(0);
  Problem<T> p;
  p.layers = layers;
  p.steps = inner_steps;
  p.first_adapted = first_adapted;
  p.support = xs.size(1);
  p.query = xq.size(1);
  p.total_tasks = tasks;
  p.kind = kind;
  p.first_order = first_order;
  p.compute_grad = compute_grad;
  p.compute_lr_grad = compute_lr_grad;
  p.reptile = reptile;
  p.rate_step_stride = schedule.per_step_lr ? 1 : 0;
  p.weights = schedule.weights;
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor& w = params[2 * l];
    weight_t.push_back(w.t().contiguous());
    p.in.push_back(w.size(1));
    p.out.push_back(w.size(0));
    p.weight.push_back(w.const_data_ptr<T>());
    p.weight_t.push_back(weight_t.back().const_data_ptr<T>());
    p.bias.push_back(params[2 * l + 1].const_data_ptr<T>());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const size_t slot = lr.size() == 1 ? 0 : i;
    p.rate.push_back(lr[slot].const_data_ptr<T>());
    p.rate_per_element.push_back(!schedule.per_step_lr && lr[slot].dim() > 0);
    p.rate_slot.push_back(slot);
  }
  p.x_support = xs.const_data_ptr<T>();
  p.x_query = xq.const_data_ptr<T>();
  const bool mse = kind == LossKind::kMse;
  p.y_support = mse ? ys.const_data_ptr<T>() : nullptr;
  p.y_query = mse ? yq.const_data_ptr<T>() : nullptr;
  p.label_support = mse ? nullptr : ys.const_data_ptr<int64_t>();
  p.label_query = mse ? nullptr : yq.const_data_ptr<int64_t>();

  Share<T> total = run_tasks(p, tasks, params, lr);
  const auto options = params[0].options();
  // in T first: a loss beyond T's range is inf, as ATen's own loss would be, not an overflow error
  Tensor loss = at::scalar_tensor(static_cast<T>(total.loss), options);
  std::vector<Tensor> grads, lr_grads;
  auto as_tensor = [&](const std::vector<T>& values, const Tensor& like) {
    Tensor t = at::empty(like.sizes(), options);
    std::copy(values.begin(), values.end(), t.mutable_data_ptr<T>());
    return t;
  };
  for (size_t i = 0; i < params.size() && compute_grad; ++i) grads.push_back(as_tensor(total.grads[i], params[i]));
  for (size_t i = 0; i < lr.size() && compute_lr_grad; ++i) lr_grads.push_back(as_tensor(total.lr_grads[i], lr[i]));
  return {loss, grads, lr_grads};
}
#endif  // METALEARN_FAST_SMALL_KERNELS

// The composite's meta-step on the CPU, in chunks of tasks, one thread per chunk, each chunk's ops single-
// threaded: per-task weights of a large MLP would not fit in cache for a whole meta-batch (every pass would
// stream them from memory), and a meta-batch's ops are too small to split across threads one by one (a fork
// and join per op). A chunk's per-task weights stay within kCpuChunkBytes (a core's L2 cache, about), and
// there are at least as many chunks as threads. The chunks' shares of the loss and gradients add up to the
// meta-batch's.
constexpr int64_t kCpuChunkBytes = 1 << 20;

MetaGrad meta_grad_in_chunks(at::TensorList params, at::TensorList lr, const Tensor& x_support,
                             const Tensor& y_support, const Tensor& x_query, const Tensor& y_query, int64_t inner_steps,
                             bool first_order, LossKind kind, int64_t first_adapted, bool compute_grad,
                             bool compute_lr_grad, const Schedule& schedule) {
  const int64_t tasks = x_support.size(0);
  int64_t bytes_per_task = 0;
  for (const auto& p : params) bytes_per_task += p.numel() * p.element_size();
  const int64_t threads = at::get_num_threads();
  const int64_t by_cache = std::max<int64_t>(1, kCpuChunkBytes / bytes_per_task);
  const int64_t chunk = std::min(by_cache, (tasks + threads - 1) / threads);
  const int64_t chunks = (tasks + chunk - 1) / chunk;
  std::vector<MetaGrad> shares(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    // worker threads start with autograd on: the kernel's ATen calls must not record a graph
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    c10::AutoGradMode no_grad(false);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t start = c * chunk, n = std::min(chunk, tasks - start);
      shares[c] = maml_mlp_meta_grad_aten(params, lr, x_support.narrow(0, start, n), y_support.narrow(0, start, n),
                                          x_query.narrow(0, start, n), y_query.narrow(0, start, n), inner_steps,
                                          first_order, kind, first_adapted, compute_grad, compute_lr_grad, tasks,
                                          schedule);
    }
  });
  MetaGrad total = std::move(shares[0]);
  for (int64_t c = 1; c < chunks; ++c) {
    auto& [loss, grads, lr_grads] = shares[c];
    std::get<0>(total).add_(loss);
    for (size_t i = 0; i < grads.size(); ++i) std::get<1>(total)[i].add_(grads[i]);
    for (size_t i = 0; i < lr_grads.size(); ++i) std::get<2>(total)[i].add_(lr_grads[i]);
  }
  return total;
}

MetaGrad maml_mlp_meta_grad_cpu(at::TensorList params, at::TensorList lr, const Tensor& x_support,
                                const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                                int64_t inner_steps, bool first_order, c10::string_view loss_name,
                                int64_t first_adapted, bool compute_grad, bool compute_lr_grad, bool per_step_lr,
                                c10::ArrayRef<double> step_weights) {
  const LossKind kind = maml_loss_kind(loss_name);
  check_maml_args(params, lr, x_support, y_support, x_query, y_query, inner_steps, kind, first_adapted,
                  "maml_mlp_meta_grad", per_step_lr);
  const Schedule schedule = make_schedule(per_step_lr, step_weights, inner_steps);
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (takes_task_kernel(params, lr, x_support, x_query, per_step_lr)) {
    return AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "maml_mlp_meta_grad_cpu", [&] {
      return task_kernel_meta_grad<scalar_t>(params, lr, x_support, y_support, x_query, y_query, inner_steps,
                                             first_order, kind, first_adapted, compute_grad, compute_lr_grad,
                                             schedule);
    });
  }
#endif
  return meta_grad_in_chunks(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, kind,
                             first_adapted, compute_grad, compute_lr_grad, schedule);
}

// reptile_mlp_step_ on the CPU: the per-task kernel's inner loop where it applies, else the composite's.
Tensor reptile_mlp_step_cpu(at::TensorList params, const Tensor& x_support, const Tensor& y_support,
                            int64_t inner_steps, double inner_lr, double outer_lr, c10::string_view loss_name) {
  const LossKind kind = check_reptile_args(params, x_support, y_support, inner_steps, loss_name);
  const Tensor rate = at::scalar_tensor(inner_lr, params[0].options());
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (takes_task_kernel(params, rate, x_support, x_support, false)) {
    const Schedule schedule = make_schedule(false, {}, inner_steps, "reptile_mlp_step_");
    auto [loss, means, unused] = AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "reptile_mlp_step_cpu", [&] {
      return task_kernel_meta_grad<scalar_t>(params, rate, x_support, y_support, x_support, y_support, inner_steps,
                                             true, kind, 0, true, false, schedule, /*reptile=*/true);
    });
    return reptile_update_(params, means, outer_lr, loss);
  }
#endif
  auto [loss, means] = reptile_mean_aten(params, x_support, y_support, inner_steps, inner_lr, kind);
  return reptile_update_(params, means, outer_lr, loss);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) {
  m.impl("maml_mlp_meta_grad", &maml_mlp_meta_grad_cpu);
  m.impl("reptile_mlp_step_", &reptile_mlp_step_cpu);
}

}  // namespace metalearn_fast
