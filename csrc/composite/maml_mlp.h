// maml_mlp_meta_grad's pieces shared by its kernels: the composite of ATen ops (any device) and
// the CPU's per-task kernel (cpu/maml_mlp_cpu.cpp), which hands larger MLPs to the composite.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <utility>
#include <vector>

#include "composite/optimizer.h"

namespace metalearn_fast {

enum class LossKind { kMse, kCrossEntropy };

// (loss, param grads, lr grads), each list empty when not asked for
using MetaGrad = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The MAML++ options of the MAML ops (How to Train Your MAML): with per_step_lr, lr[i] holds one rate per inner
// step ([inner_steps]); weights[s] is the weight of the query loss after inner step s + 1 in the meta-loss (the
// multi-step loss; given as an empty list, the last step's loss alone, weight 1).
struct Schedule {
  bool per_step_lr = false;
  std::vector<double> weights;
};

// The loss argument, checked, and every other argument (ValueError / TypeError naming it).
LossKind maml_loss_kind(c10::string_view loss_name, const char* op = "maml_mlp_meta_grad");
void check_maml_args(at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                     const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                     int64_t inner_steps, LossKind kind, int64_t first_adapted, const char* op = "maml_mlp_meta_grad",
                     bool per_step_lr = false);
// per_step_lr and step_weights, checked against inner_steps, as a Schedule.
Schedule make_schedule(bool per_step_lr, c10::ArrayRef<double> step_weights, int64_t inner_steps,
                       const char* op = "maml_mlp_meta_grad");

// maml_mlp_meta_grad through the dispatcher (the device's kernel).
MetaGrad call_maml_mlp_meta_grad(at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                                 const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                                 int64_t inner_steps, bool first_order, c10::string_view loss, int64_t first_adapted,
                                 bool compute_grad, bool compute_lr_grad, bool per_step_lr,
                                 c10::ArrayRef<double> step_weights);

// The tensors that a meta-step's optimizer updates (params, then the learned rates when learn_lr), and its update:
// maml_mlp_meta_step_'s optimizer arguments, checked.
std::pair<std::vector<at::Tensor>, OptimizerUpdate> meta_step_update(const char* op, at::TensorList params,
                                                                     at::TensorList lr, at::TensorList grads,
                                                                     at::TensorList state, bool learn_lr,
                                                                     c10::string_view optimizer,
                                                                     c10::ArrayRef<double> settings);
// maml_mlp_meta_steps_'s arguments but the optimizer's: four stacks of sets ([S, T, K, ...] each, S >= 1) whose
// first meta-batch passes check_maml_args (every meta-batch of a stack has its shapes), and all their class labels
// in range, before any meta-step changes anything.
void check_meta_steps_args(const char* op, at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                           const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                           int64_t inner_steps, LossKind kind, int64_t first_adapted, bool per_step_lr);
// maml_mlp_meta_steps_ as S meta-steps one after another, each through the dispatcher's kernels (any device), its
// arguments already checked (meta_step_update, whose tensors are `updated`, and check_meta_steps_args).
at::Tensor meta_steps_in_turn(at::TensorList params, at::TensorList lr, at::TensorList grads, at::TensorList state,
                              at::TensorList updated, const at::Tensor& x_support, const at::Tensor& y_support,
                              const at::Tensor& x_query, const at::Tensor& y_query, int64_t inner_steps,
                              bool first_order, c10::string_view loss, int64_t first_adapted, bool learn_lr,
                              c10::string_view optimizer, c10::ArrayRef<double> settings, bool per_step_lr,
                              c10::ArrayRef<double> step_weights);
// The meta-step in batched ATen ops on any device, arguments already checked, for the tasks of
// x_support..y_query, which are part of a meta-batch of total_tasks: the loss and gradients returned are their
// share of the meta-batch's (mean over all its tasks), so that shares of a meta-batch add up.
MetaGrad maml_mlp_meta_grad_aten(at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                                 const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                                 int64_t inner_steps, bool first_order, LossKind kind, int64_t first_adapted,
                                 bool compute_grad, bool compute_lr_grad, int64_t total_tasks,
                                 const Schedule& schedule);

// Reptile on an MLP: the loss of reptile_mlp_step_, and the arguments checked.
LossKind check_reptile_args(at::TensorList params, const at::Tensor& x_support, const at::Tensor& y_support,
                            int64_t inner_steps, c10::string_view loss_name);

// (mean over tasks of the support loss at the meta-parameters, per parameter the mean over tasks of its
// adapted value after inner_steps SGD steps of rate inner_lr on each task's support loss), in ATen ops.
std::pair<at::Tensor, std::vector<at::Tensor>> reptile_mean_aten(at::TensorList params, const at::Tensor& x_support,
                                                                 const at::Tensor& y_support, int64_t inner_steps,
                                                                 double inner_lr, LossKind kind);

// Reptile's update, in place: p += outer_lr * (mean - p) for each parameter. Returns loss.
at::Tensor reptile_update_(at::TensorList params, const std::vector<at::Tensor>& means, double outer_lr,
                           const at::Tensor& loss);

// mlp_loss_grad: the gradient of the mean loss of an MLP on (x [N, I], y [N, O] or [N] labels) w.r.t. its
// params [W0, b0, W1, b1, ...] (ReLU between layers), and the Hessian of that loss applied to a direction
// (one tensor per param; undefined counts as zero), both in ATen ops (any device; differentiable by autograd).
LossKind check_mlp_loss_grad_args(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                  c10::string_view loss_name);
std::vector<at::Tensor> mlp_loss_grad_aten(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                           LossKind kind);
std::vector<at::Tensor> mlp_loss_hessian_times(at::TensorList params, const at::Tensor& x, const at::Tensor& y,
                                               LossKind kind, at::TensorList direction);
// A Tensor?[] argument as tensors (undefined for None).
std::vector<at::Tensor> optional_tensors(const c10::List<std::optional<at::Tensor>>& list);

}  // namespace metalearn_fast
