// maml_mlp_meta_grad: the whole MAML meta-step of an MLP (Linear+ReLU layers, plain Linear last)
// for every task of a meta-batch at once, with an analytic meta-gradient.
//
// At meta-batch sizes the arithmetic takes microseconds and the time goes to per-op overhead: an
// autograd graph of the unrolled inner loop holds a hundred-odd nodes, each a Python call. Here
// the inner loop runs forward once, and the meta-gradient is one reverse sweep over the inner
// steps, v_s = v_{s+1} - H_s (lr * v_{s+1}), where the Hessian-vector product of the support loss
// is taken by a forward tangent pass and a second backward pass (Pearlmutter's R-operator).
// Written with batched ATen ops, so one implementation serves every device
// (CompositeExplicitAutograd) and the GPU runs it on the whole meta-batch; the CPU's kernel
// (cpu/maml_mlp_cpu.cpp) takes MLPs with small layers one task at a time and runs the others here,
// in chunks of tasks that fit in cache (maml_mlp_meta_grad_aten takes a chunk's share).
//
// Notation, layer l = 0..L-1: a_l its input (a_0 = x), z_l = a_l W_l^T + b_l,
// a_{l+1} = relu(z_l), the output is z_{L-1}; d_l = dLoss/dz_l.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "checks.h"
#include "composite/maml_mlp.h"
#include "kernel_common.h"

namespace metalearn_fast {
namespace {

using at::Tensor;

// A layer's parameters: shared by all tasks ([O,I], [O]) or one set per task ([T,O,I], [T,O]).
struct Layer {
  Tensor weight;
  Tensor bias;
};

// a [T,K,I] -> a W^T (+ bias): [T,K,O]
Tensor affine(const Tensor& a, const Tensor& weight, const Tensor& bias) {
  const int64_t tasks = a.size(0), rows = a.size(1);
  if (weight.dim() == 2) {
    Tensor flat = a.reshape({tasks * rows, a.size(2)});
    Tensor out = bias.defined() ? at::addmm(bias, flat, weight.t()) : at::mm(flat, weight.t());
    return out.view({tasks, rows, weight.size(0)});
  }
  return bias.defined() ? at::baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2)) : at::bmm(a, weight.transpose(1, 2));
}

// e [T,K,O] -> e W: [T,K,I]
Tensor times_weight(const Tensor& e, const Tensor& weight) {
  if (weight.dim() == 2) {
    return at::mm(e.reshape({e.size(0) * e.size(1), e.size(2)}), weight).view({e.size(0), e.size(1), weight.size(1)});
  }
  return at::bmm(e, weight);
}

// acc += a W^T, in place (acc fresh and contiguous)
void add_affine_(Tensor& acc, const Tensor& a, const Tensor& weight) {
  if (weight.dim() == 2) {
    acc.view({acc.size(0) * acc.size(1), acc.size(2)}).addmm_(a.reshape({a.size(0) * a.size(1), a.size(2)}), weight.t());
  } else {
    acc.baddbmm_(a, weight.transpose(1, 2));
  }
}

// acc += e W, in place (acc fresh and contiguous)
void add_times_weight_(Tensor& acc, const Tensor& e, const Tensor& weight) {
  if (weight.dim() == 2) {
    acc.view({acc.size(0) * acc.size(1), acc.size(2)}).addmm_(e.reshape({e.size(0) * e.size(1), e.size(2)}), weight);
  } else {
    acc.baddbmm_(e, weight);
  }
}

// d^T a for d [T,K,O] and a [T,K,I]: one [O,I] per task, or their sum over tasks (one GEMM over T*K rows).
Tensor task_weight_grad(const Tensor& d, const Tensor& a, bool per_task) {
  if (per_task) return weight_grad(d, a);
  const int64_t n = d.size(0) * d.size(1);
  return weight_grad(d.reshape({n, d.size(2)}), a.reshape({n, a.size(2)}));
}

// Gradient of a layer's weight and bias from d [T,K,O] and a [T,K,I]: one per task, or summed over tasks.
std::pair<Tensor, Tensor> layer_grads(const Tensor& d, const Tensor& a, bool per_task) {
  return {task_weight_grad(d, a, per_task), per_task ? d.sum(1) : d.sum(at::IntArrayRef{0, 1})};
}

struct Loss {
  LossKind kind;
  Tensor target;  // [T,K,D] values, or [T,K] int64 labels
  double scale;   // 1 in the inner loop (each task's own loss), 1/T for the meta-loss (mean over tasks)
  Tensor probs;   // softmax of the logits, kept for the Hessian (cross-entropy)

  // Sum over tasks of each task's mean loss, times scale (when need_value); fills d = dLoss/dz.
  Tensor value_and_grad(const Tensor& z, Tensor& d, bool need_value) {
    const int64_t rows = z.size(1), width = z.size(2);
    if (kind == LossKind::kMse) {
      Tensor diff = z - target;
      Tensor value = need_value ? diff.square().sum() * (scale / static_cast<double>(rows * width)) : Tensor();
      d = diff.mul_(2.0 * scale / static_cast<double>(rows * width));
      return value;
    }
    Tensor log_probs = at::log_softmax(z, -1);
    Tensor index = target.unsqueeze(-1);
    Tensor value =
        need_value ? log_probs.gather(-1, index).sum() * (-scale / static_cast<double>(rows)) : Tensor();
    probs = log_probs.exp();
    d = probs.scatter_add(-1, index, at::full(index.sizes(), -1.0, probs.options()))
            .mul_(scale / static_cast<double>(rows));
    return value;
  }

  // The loss Hessian (w.r.t. z) applied to a tangent rz.
  Tensor hessian_times(const Tensor& rz) const {
    const int64_t rows = rz.size(1), width = rz.size(2);
    if (kind == LossKind::kMse) return rz * (2.0 * scale / static_cast<double>(rows * width));
    Tensor weighted = probs * rz;
    return (weighted - probs * weighted.sum(-1, true)) * (scale / static_cast<double>(rows));
  }
};

// One pass through the network on one set of inputs, and what its backward passes need.
struct Pass {
  std::vector<Tensor> inputs;  // a_l for every layer (the body's are computed once and shared)
  // relu'(z_{l-1}) for l >= 1: 1 where a_l > 0, else 0. A support pass's masks serve its backward and
  // both sweeps of every Hessian product; a multiply by them is cheaper than threshold_backward.
  std::vector<Tensor> masks;
  std::vector<Tensor> deltas;  // d_l for the layers the backward reached
  Tensor loss;

  explicit Pass(int64_t layers) : inputs(layers), masks(layers), deltas(layers) {}
};

// Forward from layer `from` (inputs[from] must be set), loss (its value when need_value), and
// backward down to layer `stop`, returning the per-layer gradients: per task for layers >= per_task_from,
// summed over tasks below.
std::vector<std::pair<Tensor, Tensor>> forward_backward(Pass& pass, const std::vector<Layer>& layers, Loss& loss,
                                                         int64_t from, int64_t stop, int64_t per_task_from,
                                                         bool need_value) {
  const int64_t count = static_cast<int64_t>(layers.size());
  Tensor z;
  for (int64_t l = from; l < count; ++l) {
    z = affine(pass.inputs[l], layers[l].weight, layers[l].bias);
    if (l + 1 < count) {
      pass.inputs[l + 1] = z.relu_();
      pass.masks[l + 1] = at::sign(pass.inputs[l + 1]);  // a >= 0, so its sign is the mask
    }
  }
  Tensor d;
  pass.loss = loss.value_and_grad(z, d, need_value);
  std::vector<std::pair<Tensor, Tensor>> grads(count);
  for (int64_t l = count - 1; l >= stop; --l) {
    pass.deltas[l] = d;
    grads[l] = layer_grads(d, pass.inputs[l], l >= per_task_from);
    if (l > stop) d = times_weight(d, layers[l].weight).mul_(pass.masks[l]);
  }
  return grads;
}

// Hessian of the support loss at a step applied to a direction (dW, db) on the adapted layers:
// a forward tangent pass, then the backward pass of the tangent, down to layer `stop`. The result
// is per task on the adapted layers, or summed over tasks everywhere when per_task is false.
std::vector<std::pair<Tensor, Tensor>> hessian_times(const Pass& pass, const std::vector<Layer>& layers,
                                                     const Loss& loss, const std::vector<std::pair<Tensor, Tensor>>& dir,
                                                     int64_t first_adapted, int64_t stop, bool per_task) {
  const int64_t count = static_cast<int64_t>(layers.size());
  std::vector<Tensor> tangent_inputs(count);  // R a_l; zero (undefined) up to the first adapted layer
  Tensor rz;
  for (int64_t l = first_adapted; l < count; ++l) {
    rz = affine(pass.inputs[l], dir[l].first, dir[l].second);
    if (tangent_inputs[l].defined()) add_affine_(rz, tangent_inputs[l], layers[l].weight);
    if (l + 1 < count) tangent_inputs[l + 1] = rz.mul_(pass.masks[l + 1]);
  }
  Tensor rd = loss.hessian_times(rz);
  std::vector<std::pair<Tensor, Tensor>> out(count);
  for (int64_t l = count - 1; l >= stop; --l) {
    const bool adapted = l >= first_adapted;
    out[l] = layer_grads(rd, pass.inputs[l], adapted && per_task);
    if (tangent_inputs[l].defined()) {
      out[l].first.add_(task_weight_grad(pass.deltas[l], tangent_inputs[l], adapted && per_task));
    }
    if (l > stop) {
      Tensor re = times_weight(rd, layers[l].weight);
      if (adapted) add_times_weight_(re, pass.deltas[l], dir[l].first);
      rd = re.mul_(pass.masks[l]);
    }
  }
  return out;
}

// lr for a parameter at inner step s, shaped to broadcast against its per-task gradient [T, ...].
Tensor rate(const std::vector<Tensor>& lr, const Schedule& schedule, int64_t s, size_t param) {
  const Tensor& given = lr.size() == 1 ? lr[0] : lr[param];
  return schedule.per_step_lr ? given.select(0, s) : given;
}

}  // namespace

void check_maml_args(at::TensorList params, at::TensorList lr, const Tensor& xs, const Tensor& ys, const Tensor& xq,
                     const Tensor& yq, int64_t inner_steps, LossKind kind, int64_t first_adapted, const char* op,
                     bool per_step_lr) {
  TORCH_CHECK_VALUE(params.size() >= 2 && params.size() % 2 == 0, op,
                    ": params must be [weight_0, bias_0, weight_1, bias_1, ...], got ", params.size(), " tensors");
  const int64_t count = static_cast<int64_t>(params.size() / 2);
  TORCH_CHECK_VALUE(inner_steps >= 1, op, ": inner_steps must be >= 1, got ", inner_steps);
  TORCH_CHECK_VALUE(first_adapted >= 0 && first_adapted < count, op, ": first_adapted_layer must be in [0, ", count,
                    "), got ", first_adapted);
  TORCH_CHECK_VALUE(lr.size() == 1 || lr.size() == params.size(), op,
                    ": lr must hold one tensor or one per param, got ", lr.size());
  for (const auto& [name, x] : {std::pair<const char*, const Tensor&>{"x_support", xs}, {"x_query", xq}}) {
    TORCH_CHECK_TYPE(x.scalar_type() == params[0].scalar_type(), op, ": ", name, " must have the params' dtype ",
                     params[0].scalar_type(), ", got ", x.scalar_type());
    TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == xs.size(0) && x.size(1) > 0 && x.size(2) == params[0].size(1), op,
                      ": ", name, " must be [T, K, ", params[0].size(1), "] with T = ", xs.size(0),
                      " and K >= 1, got ", x.sizes());
    TORCH_CHECK_VALUE(x.device() == params[0].device(), op, ": ", name, " must be on the params' device");
  }
  TORCH_CHECK_VALUE(xs.size(0) > 0, op, ": the meta-batch is empty (T = 0)");
  for (int64_t l = 0; l < count; ++l) {
    const Tensor& w = params[2 * l];
    const Tensor& b = params[2 * l + 1];
    TORCH_CHECK_VALUE(w.dim() == 2 && b.dim() == 1 && b.size(0) == w.size(0), op, ": params[", 2 * l, "] and params[",
                      2 * l + 1, "] must be a weight [O, I] and a bias [O], got ", w.sizes(), " and ", b.sizes());
    TORCH_CHECK_VALUE(l == 0 || w.size(1) == params[2 * l - 2].size(0), op, ": params[", 2 * l, "] must take ",
                      params[2 * l - 2].size(0), " inputs, got shape ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == params[0].scalar_type() && b.scalar_type() == params[0].scalar_type(), op,
                     ": params must share one dtype");
  }
  for (size_t i = 0; i < lr.size(); ++i) {
    if (per_step_lr) {
      TORCH_CHECK_VALUE(lr[i].dim() == 1 && lr[i].size(0) == inner_steps, op, ": lr[", i,
                        "] must hold one rate per inner step, [", inner_steps, "], with per_step_lr, got ",
                        lr[i].sizes());
    } else {
      TORCH_CHECK_VALUE(lr[i].dim() == 0 || lr[i].sizes() == params[i].sizes(), op, ": lr[", i,
                        "] must be a scalar or have the shape of params[", i, "], got ", lr[i].sizes());
    }
  }
  const int64_t width = params[params.size() - 2].size(0);
  for (const auto& [name, y, x] : {std::tuple<const char*, const Tensor&, const Tensor&>{"y_support", ys, xs},
                                   {"y_query", yq, xq}}) {
    if (kind == LossKind::kMse) {
      TORCH_CHECK_VALUE(y.dim() == 3 && y.size(0) == x.size(0) && y.size(1) == x.size(1) && y.size(2) == width, op,
                        ": ", name, " must be [T, K, ", width, "] for the mse loss, got ", y.sizes());
      TORCH_CHECK_TYPE(y.scalar_type() == params[0].scalar_type(), op, ": ", name, " must have the params' dtype");
    } else {
      TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == x.size(1), op, ": ", name,
                        " must be [T, K] class labels for cross_entropy, got ", y.sizes());
      TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, op, ": ", name, " must be int64 labels, got ", y.scalar_type());
      check_labels_in_range(op, name, y, width);
    }
  }
}

Schedule make_schedule(bool per_step_lr, c10::ArrayRef<double> step_weights, int64_t inner_steps, const char* op) {
  TORCH_CHECK_VALUE(step_weights.empty() || static_cast<int64_t>(step_weights.size()) == inner_steps, op,
                    ": step_weights must hold one weight per inner step (", inner_steps, ") or none, got ",
                    step_weights.size());
  for (double w : step_weights) TORCH_CHECK_VALUE(std::isfinite(w), op, ": step_weights must be finite, got ", w);
  Schedule schedule{per_step_lr, std::vector<double>(step_weights.begin(), step_weights.end())};
  if (schedule.weights.empty() && inner_steps > 0) {
    schedule.weights.assign(inner_steps, 0.0);
    schedule.weights.back() = 1.0;
  }
  return schedule;
}

namespace {

// What the inner loop leaves for the reverse sweep: the layers at each step s (steps[0] the meta-parameters,
// steps[S] the adapted ones), the support pass at each step, its gradients and (cross-entropy) probabilities.
struct InnerLoop {
  std::vector<std::vector<Layer>> steps;
  std::vector<Pass> passes;
  std::vector<std::vector<std::pair<Tensor, Tensor>>> grads;
  std::vector<Tensor> probs;
};

InnerLoop inner_loop(at::TensorList params, const std::vector<Tensor>& lr, const Schedule& schedule,
                     const Tensor& x_support, const Tensor& y_support, LossKind kind, int64_t inner_steps,
                     int64_t first_adapted) {
  const int64_t count = static_cast<int64_t>(params.size() / 2);
  InnerLoop loop{std::vector<std::vector<Layer>>(1), std::vector<Pass>(inner_steps, Pass(count)),
                 std::vector<std::vector<std::pair<Tensor, Tensor>>>(inner_steps), std::vector<Tensor>(inner_steps)};
  for (int64_t l = 0; l < count; ++l) loop.steps[0].push_back({params[2 * l], params[2 * l + 1]});
  Loss support_loss{kind, y_support, 1.0, Tensor()};
  // The body (layers before the first adapted one) never changes in the inner loop: run it once.
  // Second-order ANIL still differentiates through it, so its backward goes all the way down then.
  for (int64_t s = 0; s < inner_steps; ++s) {
    Pass& pass = loop.passes[s];
    if (s == 0) {
      pass.inputs[0] = x_support;
    } else {
      for (int64_t l = 0; l <= first_adapted; ++l) {
        pass.inputs[l] = loop.passes[0].inputs[l];
        pass.masks[l] = loop.passes[0].masks[l];
      }
    }
    const int64_t from = s == 0 ? 0 : first_adapted;
    loop.grads[s] = forward_backward(pass, loop.steps[s], support_loss, from, first_adapted, first_adapted, false);
    loop.probs[s] = support_loss.probs;
    std::vector<Layer> next = loop.steps[s];
    for (int64_t l = first_adapted; l < count; ++l) {
      const auto& [weight, bias] = loop.steps[s][l];
      next[l].weight = at::addcmul(weight, loop.grads[s][l].first, rate(lr, schedule, s, 2 * l), -1);
      next[l].bias = at::addcmul(bias, loop.grads[s][l].second, rate(lr, schedule, s, 2 * l + 1), -1);
    }
    loop.steps.push_back(std::move(next));
  }
  return loop;
}

// The reverse sweep over the inner steps. On entry v holds the per-task query gradient w.r.t. the adapted
// parameters and body_grads the (task-summed) body gradient; on return v holds the gradient w.r.t. the
// meta-parameters (summed over tasks when the step-0 Hessian term was taken, per task otherwise) and
// body_grads the body's. add_query(s) adds the weighted query gradient at step s's weights (the multi-step
// loss) once v holds v_s. Returns d lr = -sum over tasks of g_s * v_{s+1}, summed over the steps (per step
// with per-step rates), reduced to lr's shapes.
std::vector<Tensor> reverse_sweep(const InnerLoop& loop, const std::vector<Tensor>& lr, const Schedule& schedule,
                                  LossKind kind, const Tensor& y_support, int64_t first_adapted, bool first_order,
                                  bool compute_grad, bool compute_lr_grad, std::vector<Tensor>& v,
                                  std::vector<Tensor>& body_grads, const std::function<void(int64_t)>& add_query) {
  const int64_t count = static_cast<int64_t>(v.size() / 2), inner_steps = static_cast<int64_t>(loop.passes.size());
  const int64_t hessian_stop = compute_grad ? 0 : first_adapted;
  const bool per_step = schedule.per_step_lr;
  const bool scalar_lr = lr.size() == 1 && (per_step || lr[0].dim() == 0);
  std::vector<Tensor> lr_grads(lr.size());
  // The Hessian term at step 0 only feeds the parameters' gradient: it is taken when that is asked
  // for, and summed over tasks (v holds task sums from then on).
  const bool step0_hessian = !first_order && compute_grad;
  for (int64_t s = inner_steps - 1; s >= 0; --s) {
    const auto& g = loop.grads[s];
    for (int64_t l = first_adapted; l < count && compute_lr_grad; ++l) {
      for (int64_t which = 0; which < 2; ++which) {
        const size_t i = 2 * l + which;
        const Tensor& gi = which == 0 ? g[l].first : g[l].second;
        const size_t slot = lr.size() == 1 ? 0 : i;
        if (per_step) {
          if (!lr_grads[slot].defined()) lr_grads[slot] = at::zeros_like(lr[slot]);
          lr_grads[slot].select(0, s).sub_((gi * v[i]).sum());
          continue;
        }
        Tensor term = lr[slot].dim() == 0 ? -(gi * v[i]).sum() : -(gi * v[i]).sum(0);
        lr_grads[slot] = lr_grads[slot].defined() ? lr_grads[slot] + term : term;
      }
    }
    if (s == 0 ? step0_hessian : !first_order) {
      // v_s = v_{s+1} - H_s (lr * v_{s+1}). With one scalar rate, H is applied to v itself and the
      // rate scales the result, which saves a product per parameter.
      std::vector<std::pair<Tensor, Tensor>> direction(count);
      for (int64_t l = first_adapted; l < count; ++l) {
        direction[l] = scalar_lr ? std::make_pair(v[2 * l], v[2 * l + 1])
                                 : std::make_pair(rate(lr, schedule, s, 2 * l) * v[2 * l],
                                                  rate(lr, schedule, s, 2 * l + 1) * v[2 * l + 1]);
      }
      if (s == 0) {
        for (int64_t i = 2 * first_adapted; i < static_cast<int64_t>(v.size()); ++i) v[i] = v[i].sum(0);
      }
      Loss at_step{kind, y_support, 1.0, loop.probs[s]};
      auto hv = hessian_times(loop.passes[s], loop.steps[s], at_step, direction, first_adapted, hessian_stop, s > 0);
      const Tensor step_lr = scalar_lr ? rate(lr, schedule, s, 0) : Tensor();
      for (int64_t l = hessian_stop; l < count; ++l) {
        auto& target = l >= first_adapted ? v : body_grads;
        for (int64_t which = 0; which < 2; ++which) {
          const Tensor& term = which == 0 ? hv[l].first : hv[l].second;
          Tensor& into = target[2 * l + which];
          if (scalar_lr) {
            into.addcmul_(term, step_lr, -1);
          } else {
            into.sub_(term);
          }
        }
      }
    }
    if (s > 0 && schedule.weights[s - 1] != 0) add_query(s);
  }
  if (step0_hessian) return lr_grads;
  for (int64_t i = 2 * first_adapted; i < static_cast<int64_t>(v.size()); ++i) v[i] = v[i].sum(0);
  return lr_grads;
}

}  // namespace

MetaGrad maml_mlp_meta_grad_aten(at::TensorList params, at::TensorList lr_in, const Tensor& x_support,
                                 const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                                 int64_t inner_steps, bool first_order, LossKind kind, int64_t first_adapted,
                                 bool compute_grad, bool compute_lr_grad, int64_t total_tasks,
                                 const Schedule& schedule) {
  const std::vector<Tensor> lr(lr_in.begin(), lr_in.end());
  const int64_t count = static_cast<int64_t>(params.size() / 2);
  const InnerLoop loop = inner_loop(params, lr, schedule, x_support, y_support, kind, inner_steps, first_adapted);

  // First order without rate gradients needs only the task-summed query gradients.
  const bool sweep = !first_order || compute_lr_grad;
  const int64_t query_stop = compute_grad ? 0 : (compute_lr_grad ? first_adapted : count);
  Tensor loss;
  // The weighted query loss at step `step`'s weights (its share of the mean over tasks) and its gradient:
  // per task on the adapted layers when the sweep follows.
  auto query_at = [&](int64_t step) {
    Pass query(count);
    query.inputs[0] = x_query;
    Loss query_loss{kind, y_query, schedule.weights[step - 1] / static_cast<double>(total_tasks), Tensor()};
    auto grads = forward_backward(query, loop.steps[step], query_loss, 0, query_stop, sweep ? first_adapted : count,
                                  true);
    loss = loss.defined() ? loss + query.loss : query.loss;
    return grads;
  };
  auto query_grads = query_at(inner_steps);
  if (!compute_grad && !compute_lr_grad) {
    for (int64_t s = 1; s < inner_steps; ++s) {
      if (schedule.weights[s - 1] != 0) query_at(s);
    }
    return {loss, {}, {}};
  }
  std::vector<Tensor> v(params.size()), body_grads(params.size()), lr_grads;
  for (int64_t l = 0; l < count; ++l) {
    auto& target = !sweep || l < first_adapted ? body_grads : v;
    target[2 * l] = query_grads[l].first;
    target[2 * l + 1] = query_grads[l].second;
  }
  auto add_query = [&](int64_t step) {
    const auto grads = query_at(step);
    for (int64_t l = query_stop; l < count; ++l) {
      auto& target = !sweep || l < first_adapted ? body_grads : v;
      target[2 * l].add_(grads[l].first);
      target[2 * l + 1].add_(grads[l].second);
    }
  };
  if (sweep) {
    lr_grads = reverse_sweep(loop, lr, schedule, kind, y_support, first_adapted, first_order, compute_grad,
                             compute_lr_grad, v, body_grads, add_query);
  } else {
    for (int64_t s = inner_steps - 1; s >= 1; --s) {
      if (schedule.weights[s - 1] != 0) add_query(s);
    }
  }
  std::vector<Tensor> grads;
  for (size_t i = 0; i < params.size() && compute_grad; ++i) {
    // contiguous outputs, whatever layout the GEMMs above left
    const bool adapted = sweep && static_cast<int64_t>(i / 2) >= first_adapted;
    grads.push_back((adapted ? v[i] : body_grads[i]).contiguous());
  }
  if (!compute_lr_grad) lr_grads.clear();
  for (auto& t : lr_grads) {
    t = t.defined() ? t.contiguous() : at::zeros_like(lr[&t - lr_grads.data()]);
  }
  return {loss, grads, lr_grads};
}

MetaGrad call_maml_mlp_meta_grad(at::TensorList params, at::TensorList lr, const Tensor& x_support,
                                 const Tensor& y_support, const Tensor& x_query, const Tensor& y_query,
                                 int64_t inner_steps, bool first_order, c10::string_view loss, int64_t first_adapted,
                                 bool compute_grad, bool compute_lr_grad, bool per_step_lr,
                                 c10::ArrayRef<double> step_weights) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("metalearn_fast::maml_mlp_meta_grad", "")
                       .typed<MetaGrad(at::TensorList, at::TensorList, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, int64_t, bool, c10::string_view, int64_t, bool, bool, bool,
                                       c10::ArrayRef<double>)>();
  return op.call(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, loss, first_adapted,
                 compute_grad, compute_lr_grad, per_step_lr, step_weights);
}

LossKind maml_loss_kind(c10::string_view loss_name, const char* op) {
  TORCH_CHECK_VALUE(loss_name == "mse" || loss_name == "cross_entropy", op,
                    ": loss must be 'mse' or 'cross_entropy', got '", std::string(loss_name), "'");
  return loss_name == "mse" ? LossKind::kMse : LossKind::kCrossEntropy;
}

namespace {

MetaGrad maml_mlp_meta_grad(at::TensorList params, at::TensorList lr, const Tensor& x_support, const Tensor& y_support,
                            const Tensor& x_query, const Tensor& y_query, int64_t inner_steps, bool first_order,
                            c10::string_view loss_name, int64_t first_adapted, bool compute_grad,
                            bool compute_lr_grad, bool per_step_lr, c10::ArrayRef<double> step_weights) {
  const LossKind kind = maml_loss_kind(loss_name);
  check_maml_args(params, lr, x_support, y_support, x_query, y_query, inner_steps, kind, first_adapted,
                  "maml_mlp_meta_grad", per_step_lr);
  const Schedule schedule = make_schedule(per_step_lr, step_weights, inner_steps);
  return maml_mlp_meta_grad_aten(params, lr, x_support, y_support, x_query, y_query, inner_steps, first_order, kind,
                                 first_adapted, compute_grad, compute_lr_grad, x_support.size(0), schedule);
}

// maml_mlp_loss below autograd (no gradient wanted): the loss alone, from the device's
// maml_mlp_meta_grad kernel.
Tensor maml_mlp_loss(at::TensorList params, at::TensorList lr, const Tensor& x_support, const Tensor& y_support,
                     const Tensor& x_query, const Tensor& y_query, int64_t inner_steps, bool first_order,
                     c10::string_view loss_name, int64_t first_adapted, bool per_step_lr,
                     c10::ArrayRef<double> step_weights) {
  return std::get<0>(call_maml_mlp_meta_grad(params, lr, x_support, y_support, x_query, y_query, inner_steps,
                                             first_order, loss_name, first_adapted, false, false, per_step_lr,
                                             step_weights));
}


Tensor reptile_mlp_step(at::TensorList params, const Tensor& x_support, const Tensor& y_support, int64_t inner_steps,
                        double inner_lr, double outer_lr, c10::string_view loss_name) {
  const LossKind kind = check_reptile_args(params, x_support, y_support, inner_steps, loss_name);
  auto [loss, means] = reptile_mean_aten(params, x_support, y_support, inner_steps, inner_lr, kind);
  return reptile_update_(params, means, outer_lr, loss);
}

}  // namespace

LossKind check_reptile_args(at::TensorList params, const Tensor& x_support, const Tensor& y_support,
                            int64_t inner_steps, c10::string_view loss_name) {
  const LossKind kind = maml_loss_kind(loss_name);
  const Tensor rate = at::scalar_tensor(0.0, params.empty() ? x_support.options() : params[0].options());
  // the support set serves as the query set of maml_mlp_meta_grad's checks
  check_maml_args(params, rate, x_support, y_support, x_support, y_support, inner_steps, kind, 0);
  return kind;
}

std::pair<Tensor, std::vector<Tensor>> reptile_mean_aten(at::TensorList params, const Tensor& x_support,
                                                         const Tensor& y_support, int64_t inner_steps, double inner_lr,
                                                         LossKind kind) {
  const int64_t count = static_cast<int64_t>(params.size() / 2), tasks = x_support.size(0);
  std::vector<Layer> layers;  // shared by the tasks at step 0, then one set per task
  for (int64_t l = 0; l < count; ++l) layers.push_back({params[2 * l], params[2 * l + 1]});
  Loss support{kind, y_support, 1.0, Tensor()};
  Tensor first_loss;
  for (int64_t s = 0; s < inner_steps; ++s) {
    Pass pass(count);
    pass.inputs[0] = x_support;
    const auto grads = forward_backward(pass, layers, support, 0, 0, 0, s == 0);
    if (s == 0) first_loss = pass.loss / static_cast<double>(tasks);
    for (int64_t l = 0; l < count; ++l) {
      layers[l].weight = at::sub(layers[l].weight, grads[l].first, inner_lr);
      layers[l].bias = at::sub(layers[l].bias, grads[l].second, inner_lr);
    }
  }
  std::vector<Tensor> means;
  for (const auto& layer : layers) {
    means.push_back(layer.weight.mean(0));
    means.push_back(layer.bias.mean(0));
  }
  return {first_loss, means};
}

Tensor reptile_update_(at::TensorList params, const std::vector<Tensor>& means, double outer_lr, const Tensor& loss) {
  for (size_t i = 0; i < params.size(); ++i) {
    Tensor param = params[i];
    param.add_((means[i] - param).mul_(outer_lr));
  }
  return loss;
}

std::vector<Tensor> optional_tensors(const c10::List<std::optional<Tensor>>& list) {
  std::vector<Tensor> out;
  for (const auto& item : list) {
    const std::optional<Tensor> value = item;
    out.push_back(value.has_value() ? *value : Tensor());
  }
  return out;
}

LossKind check_mlp_loss_grad_args(at::TensorList params, const Tensor& x, const Tensor& y,
                                  c10::string_view loss_name) {
  const char* op = "mlp_loss_grad";
  const LossKind kind = maml_loss_kind(loss_name, op);
  TORCH_CHECK_VALUE(!params.empty(), op, ": params is empty");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) > 0, op, ": x must be [N, I] with N >= 1, got ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == params[0].scalar_type(), op, ": x must have the params' dtype ",
                   params[0].scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == params[0].device() && y.device() == x.device(), op,
                    ": x and y must be on the params' device ", params[0].device());
  if (kind == LossKind::kMse) {
    TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == x.size(0), op, ": y must be [", x.size(0),
                      ", outputs] for the mse loss, got ", y.sizes());
  } else {
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == x.size(0), op, ": y must be [", x.size(0),
                      "] class labels for cross_entropy, got ", y.sizes());
  }
  // the rest as the MAML op checks it, with (x, y) as one task's support and query set
  const Tensor xs = x.unsqueeze(0), ys = y.unsqueeze(0);
  check_maml_args(params, at::scalar_tensor(0.0, params[0].options()), xs, ys, xs, ys, 1, kind, 0, op);
  return kind;
}

namespace {

// (x, y) as the one task of a meta-batch, and the loss the pieces above take
std::vector<Layer> as_layers(at::TensorList params) {
  std::vector<Layer> layers;
  for (size_t l = 0; l < params.size() / 2; ++l) layers.push_back({params[2 * l], params[2 * l + 1]});
  return layers;
}

// [W0, b0, W1, b1, ...], each contiguous like its parameter (as the ops' fake kernels say): a weight's gradient
// can come out of its matrix product as a transposed view
std::vector<Tensor> flatten(const std::vector<std::pair<Tensor, Tensor>>& grads) {
  std::vector<Tensor> out;
  for (const auto& [weight, bias] : grads) {
    out.push_back(weight.contiguous());
    out.push_back(bias.contiguous());
  }
  return out;
}

}  // namespace

std::vector<Tensor> mlp_loss_grad_aten(at::TensorList params, const Tensor& x, const Tensor& y, LossKind kind) {
  const std::vector<Layer> layers = as_layers(params);
  const int64_t count = static_cast<int64_t>(layers.size());
  Pass pass(count);
  pass.inputs[0] = x.unsqueeze(0);
  Loss loss{kind, y.unsqueeze(0), 1.0, Tensor()};
  return flatten(forward_backward(pass, layers, loss, 0, 0, count, false));
}

std::vector<Tensor> mlp_loss_hessian_times(at::TensorList params, const Tensor& x, const Tensor& y, LossKind kind,
                                           at::TensorList direction) {
  const std::vector<Layer> layers = as_layers(params);
  const int64_t count = static_cast<int64_t>(layers.size());
  Pass pass(count);
  pass.inputs[0] = x.unsqueeze(0);
  Loss loss{kind, y.unsqueeze(0), 1.0, Tensor()};
  forward_backward(pass, layers, loss, 0, 0, count, false);
  std::vector<std::pair<Tensor, Tensor>> dir(count);
  for (int64_t l = 0; l < count; ++l) {
    for (int64_t k = 0; k < 2; ++k) {
      const Tensor& given = direction[2 * l + k];
      Tensor& slot = k == 0 ? dir[l].first : dir[l].second;
      slot = given.defined() ? given : at::zeros_like(params[2 * l + k]);
    }
  }
  return flatten(hessian_times(pass, layers, loss, dir, 0, 0, false));
}

namespace {

std::vector<Tensor> mlp_loss_grad(at::TensorList params, const Tensor& x, const Tensor& y, c10::string_view loss_name) {
  return mlp_loss_grad_aten(params, x, y, check_mlp_loss_grad_args(params, x, y, loss_name));
}

std::vector<Tensor> mlp_loss_hessian_times_op(at::TensorList params, const Tensor& x, const Tensor& y,
                                              c10::string_view loss_name, const c10::List<std::optional<Tensor>>& dir) {
  return mlp_loss_hessian_times(params, x, y, check_mlp_loss_grad_args(params, x, y, loss_name), optional_tensors(dir));
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CompositeExplicitAutograd, m) {
  m.impl("mlp_loss_grad", &mlp_loss_grad);
  m.impl("mlp_loss_hessian_times", &mlp_loss_hessian_times_op);
  m.impl("maml_mlp_meta_grad", &maml_mlp_meta_grad);
  m.impl("maml_mlp_loss", &maml_mlp_loss);
  m.impl("reptile_mlp_step_", &reptile_mlp_step);
}

}  // namespace metalearn_fast
