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
// order, so results do not depend on scheduling. The loops (cpu/maml_mlp_task_impl.h) are compiled
// for AVX2 + FMA and for AVX-512, each used when the CPU has it and cpu_simd() allows it (checked at
// run time). Larger layers, where the composite's batched GEMMs share the weights across tasks, other
// dtypes, and CPUs without AVX2 take the composite.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "composite/maml_mlp.h"
#include "cpu/optimizer_cpu.h"
#include "cpu/small_kernels.h"

namespace metalearn_fast {
namespace {

using at::Tensor;

#ifdef METALEARN_FAST_SMALL_KERNELS
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
  // elements from one task's block of each to the next (task_blocks): x_support, x_query, y (or labels) of each
  int64_t xs_stride, xq_stride, ys_stride, yq_stride;
};

// t [T, ...] as the kernel reads it: each task's block contiguous, the tasks any distance apart. A batch whose
// support and query sets are slices of one tensor per task (SinusoidTasks draws them so) is read in place.
Tensor task_blocks(const Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return t.contiguous();
    expected *= t.size(d);
  }
  return t;
}

// What a thread accumulates over its tasks.
template <typename T>
struct Share {
  double loss = 0;
  std::vector<std::vector<T>> grads;     // per param
  std::vector<std::vector<T>> lr_grads;  // per lr tensor
};
// The per-task kernel compiled twice: for AVX2 + FMA with the small kernels of small_kernels.h, and for
// AVX-512 with its own copy of them (512-bit registers, four rows per GEMM block in 32 registers). Which
// runs is cpu_simd()'s choice, made per call.
namespace avx2 {
METALEARN_FAST_BEGIN_AVX2
using namespace small;
#include "cpu/maml_mlp_task_impl.h"
METALEARN_FAST_END_AVX2
}  // namespace avx2

namespace avx512 {
METALEARN_FAST_BEGIN_AVX512
namespace small512 {
constexpr int kVectorBytes = 64;
#include "cpu/small_kernels_impl.h"
}  // namespace small512
using namespace small512;
#include "cpu/maml_mlp_task_impl.h"
METALEARN_FAST_END_AVX512
}  // namespace avx512

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

// One set of the meta-batches as the kernel reads it (task_blocks): a meta-batch's set [T, ...] (steps 0), or
// maml_mlp_meta_steps_'s stack of them [S, T, ...], read in place when its first meta-batch is and copied whole
// otherwise.
struct SetBlocks {
  Tensor blocks;
  int64_t task_stride, step_stride;

  SetBlocks(const Tensor& set, bool stacked) {
    if (!stacked) {
      blocks = task_blocks(set);
      task_stride = blocks.stride(0), step_stride = 0;
      return;
    }
    const Tensor first = set.select(0, 0);
    blocks = task_blocks(first).is_same(first) ? set : set.contiguous();
    task_stride = blocks.stride(1), step_stride = blocks.stride(0);
  }
  template <typename E>
  const E* at_step(int64_t s) const {
    return blocks.const_data_ptr<E>() + s * step_stride;
  }
};

// A call's Problem and what its pointers point into: the params and rates (contiguous), the weights transposed,
// the sets. Made once for any number of meta-steps: between two, the params change in place (transpose_weights
// then) and the Problem moves to the next meta-batch of a stack (at_step).
template <typename T>
class PreparedProblem {
 public:
  PreparedProblem(at::TensorList params_in, at::TensorList lr_in, const Tensor& x_support, const Tensor& y_support,
                  const Tensor& x_query, const Tensor& y_query, bool stacked, int64_t inner_steps, bool first_order,
                  LossKind kind, int64_t first_adapted, bool compute_grad, bool compute_lr_grad,
                  const Schedule& schedule, bool reptile)
      : xs_(x_support, stacked), ys_(y_support, stacked), xq_(x_query, stacked), yq_(y_query, stacked) {
    for (const auto& t : params_in) params.push_back(t.contiguous());
    for (const auto& t : lr_in) lr.push_back(t.contiguous());
    const int64_t layers = static_cast<int64_t>(params.size() / 2), set_dim = stacked ? 1 : 0;
    p.layers = layers;
    p.steps = inner_steps;
    p.first_adapted = first_adapted;
    p.support = x_support.size(set_dim + 1);
    p.query = x_query.size(set_dim + 1);
    p.total_tasks = x_support.size(set_dim);
    p.kind = kind;
    p.first_order = first_order;
    p.compute_grad = compute_grad;
    p.compute_lr_grad = compute_lr_grad;
    p.reptile = reptile;
    p.rate_step_stride = schedule.per_step_lr ? 1 : 0;
    p.weights = schedule.weights;
    // W^T, transposed here (an ATen transpose costs more); none for a layer whose rows the kernel reads as they are
    weight_t_.resize(layers);
    for (int64_t l = 0; l < layers; ++l) {
      const Tensor& w = params[2 * l];
      if (!reads_weight_rows(w.size(1))) weight_t_[l].resize(w.numel());
      p.in.push_back(w.size(1));
      p.out.push_back(w.size(0));
      p.weight.push_back(w.const_data_ptr<T>());
      p.weight_t.push_back(weight_t_[l].data());
      p.bias.push_back(params[2 * l + 1].const_data_ptr<T>());
    }
    transpose_weights();
    for (size_t i = 0; i < params.size(); ++i) {
      const size_t slot = lr.size() == 1 ? 0 : i;
      p.rate.push_back(lr[slot].const_data_ptr<T>());
      p.rate_per_element.push_back(!schedule.per_step_lr && lr[slot].dim() > 0);
      p.rate_slot.push_back(slot);
    }
    p.xs_stride = xs_.task_stride;
    p.xq_stride = xq_.task_stride;
    p.ys_stride = ys_.task_stride;
    p.yq_stride = yq_.task_stride;
    at_step(0);
  }

  void transpose_weights() {
    for (int64_t l = 0; l < p.layers; ++l) {
      if (!weight_t_[l].empty()) small::transpose(weight_t_[l].data(), p.weight[l], p.out[l], p.in[l]);
    }
  }

  void at_step(int64_t s) {
    p.x_support = xs_.at_step<T>(s);
    p.x_query = xq_.at_step<T>(s);
    const bool mse = p.kind == LossKind::kMse;
    p.y_support = mse ? ys_.at_step<T>(s) : nullptr;
    p.y_query = mse ? yq_.at_step<T>(s) : nullptr;
    p.label_support = mse ? nullptr : ys_.at_step<int64_t>(s);
    p.label_query = mse ? nullptr : yq_.at_step<int64_t>(s);
  }

  std::vector<Tensor> params, lr;
  Problem<T> p;

 private:
  std::vector<std::vector<T>> weight_t_;
  SetBlocks xs_, ys_, xq_, yq_;
};

// The per-task kernel's runs of `prepared`'s Problem in cpu_simd()'s instruction set: each call runs the meta-batch
// the Problem points to and returns the tasks' shares added up (its argument: whether it is the last run,
// TaskRunner::run).
template <typename T>
std::function<const Share<T>&(bool)> task_runner(const PreparedProblem<T>& prepared) {
  const int64_t tasks = prepared.p.total_tasks;
  if (cpu_simd() == CpuSimd::kAvx512) {
    auto runner = std::make_shared<avx512::TaskRunner<T>>(prepared.p, tasks, prepared.params, prepared.lr);
    return [runner](bool last) -> const Share<T>& { return runner->run(last); };
  }
  auto runner = std::make_shared<avx2::TaskRunner<T>>(prepared.p, tasks, prepared.params, prepared.lr);
  return [runner](bool last) -> const Share<T>& { return runner->run(last); };
}

template <typename T>
MetaGrad task_kernel_meta_grad(at::TensorList params_in, at::TensorList lr_in, const Tensor& x_support,
                               const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                               int64_t inner_steps, bool first_order, LossKind kind, int64_t first_adapted,
                               bool compute_grad, bool compute_lr_grad, const Schedule& schedule,
                               bool reptile = false) {
  const PreparedProblem<T> prepared(params_in, lr_in, x_support, y_support, x_query, y_query, false, inner_steps,
                                    first_order, kind, first_adapted, compute_grad, compute_lr_grad, schedule,
                                    reptile);
  const auto run = task_runner(prepared);
  const Share<T>& total = run(true);
  const auto options = prepared.params[0].options();
  // in T first: a loss beyond T's range is inf, as ATen's own loss would be, not an overflow error
  Tensor loss = at::scalar_tensor(static_cast<T>(total.loss), options);
  std::vector<Tensor> grads, lr_grads;
  auto as_tensor = [&](const std::vector<T>& values, const Tensor& like) {
    Tensor t = at::empty(like.sizes(), options);
    std::copy(values.begin(), values.end(), t.mutable_data_ptr<T>());
    return t;
  };
  for (size_t i = 0; i < prepared.params.size() && compute_grad; ++i) {
    grads.push_back(as_tensor(total.grads[i], prepared.params[i]));
  }
  for (size_t i = 0; i < prepared.lr.size() && compute_lr_grad; ++i) {
    lr_grads.push_back(as_tensor(total.lr_grads[i], prepared.lr[i]));
  }
  return {loss, grads, lr_grads};
}

// maml_mlp_meta_steps_ with the per-task kernel: one Problem and one set of workspaces for all the meta-steps, the
// gradients written into grads and the optimizer's raw loops run on them, step after step. params (updated in
// place, read by the kernel where they are) and every tensor the optimizer updates are contiguous.
template <typename T>
Tensor task_kernel_meta_steps(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                              at::TensorList updated, OptimizerUpdate update, const Tensor& x_support,
                              const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                              int64_t inner_steps, bool first_order, LossKind kind, int64_t first_adapted,
                              bool learn_lr, const Schedule& schedule) {
  PreparedProblem<T> prepared(params, lr, x_support, y_support, x_query, y_query, true, inner_steps, first_order,
                              kind, first_adapted, true, learn_lr, schedule, false);
  const auto run = task_runner(prepared);
  const int64_t steps = x_support.size(0);
  Tensor losses = at::empty({steps}, params[0].options());
  T* loss = losses.mutable_data_ptr<T>();
  for (int64_t s = 0; s < steps; ++s) {
    if (s > 0) {
      prepared.at_step(s);
      prepared.transpose_weights();
    }
    const Share<T>& total = run(s + 1 == steps);
    loss[s] = static_cast<T>(total.loss);
    for (size_t i = 0; i < updated.size(); ++i) {
      const std::vector<T>& g = i < params.size() ? total.grads[i] : total.lr_grads[i - params.size()];
      std::copy(g.begin(), g.end(), grads[i].mutable_data_ptr<T>());
    }
    raw_optimizer_update<T>(update, updated, grads, state);
    update.momentum_buffers_filled();
  }
  return losses;
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

// maml_mlp_meta_steps_ on the CPU: the per-task kernel's meta-steps one after another in one Problem where the kernel
// takes the call and the optimizer's raw loops apply, else the meta-steps in turn through the dispatcher.
Tensor maml_mlp_meta_steps_cpu(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                               const Tensor& x_support, const Tensor& y_support, const Tensor& x_query,
                               const Tensor& y_query, int64_t inner_steps, bool first_order,
                               c10::string_view loss_name, int64_t first_adapted, bool learn_lr,
                               c10::string_view optimizer, c10::ArrayRef<double> settings, bool per_step_lr,
                               c10::ArrayRef<double> step_weights) {
  const char* op = "maml_mlp_meta_steps_";
  auto [updated, update] = meta_step_update(op, params, lr, grads, state, learn_lr, optimizer, settings);
  const LossKind kind = maml_loss_kind(loss_name, op);
  check_meta_steps_args(op, params, lr, x_support, y_support, x_query, y_query, inner_steps, kind, first_adapted,
                        per_step_lr);
#ifdef METALEARN_FAST_SMALL_KERNELS
  // raw_loops_apply: every updated tensor (the params first) of one float dtype, contiguous
  if (raw_loops_apply(updated, grads, state) &&
      takes_task_kernel(params, lr, x_support.select(0, 0), x_query.select(0, 0), per_step_lr)) {
    const Schedule schedule = make_schedule(per_step_lr, step_weights, inner_steps, op);
    return AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "maml_mlp_meta_steps_cpu", [&] {
      return task_kernel_meta_steps<scalar_t>(params, lr, grads, state, updated, update, x_support, y_support,
                                              x_query, y_query, inner_steps, first_order, kind, first_adapted,
                                              learn_lr, schedule);
    });
  }
#endif
  return meta_steps_in_turn(params, lr, grads, state, updated, x_support, y_support, x_query, y_query, inner_steps,
                            first_order, loss_name, first_adapted, learn_lr, optimizer, settings, per_step_lr,
                            step_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) {
  m.impl("maml_mlp_meta_grad", &maml_mlp_meta_grad_cpu);
  m.impl("maml_mlp_meta_steps_", &maml_mlp_meta_steps_cpu);
  m.impl("reptile_mlp_step_", &reptile_mlp_step_cpu);
}

}  // namespace metalearn_fast
