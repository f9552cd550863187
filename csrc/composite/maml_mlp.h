// maml_mlp_meta_grad's pieces shared by its kernels: the composite of ATen ops (any device) and
// the CPU's per-task kernel (cpu/maml_mlp_cpu.cpp), which hands larger MLPs to the composite.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace metalearn_fast {

enum class LossKind { kMse, kCrossEntropy };

// (loss, param grads, lr grads), each list empty when not asked for
using MetaGrad = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The loss argument, checked, and every other argument (ValueError / TypeError naming it).
LossKind maml_loss_kind(c10::string_view loss_name);
void check_maml_args(at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                     const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                     int64_t inner_steps, LossKind kind, int64_t first_adapted);

// On the CPU, MLPs whose every weight has at most this many elements take the per-task kernel, when
// the CPU has AVX2 and FMA (cpu_task_kernel_available); larger ones take the batched composite.
constexpr int64_t kMaxTaskLayer = 128 * 128;
bool cpu_task_kernel_available();

// maml_mlp_meta_grad through the dispatcher (the device's kernel).
MetaGrad call_maml_mlp_meta_grad(at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                                 const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                                 int64_t inner_steps, bool first_order, c10::string_view loss, int64_t first_adapted,
                                 bool compute_grad, bool compute_lr_grad);

// The meta-step in batched ATen ops, arguments already checked.
MetaGrad maml_mlp_meta_grad_aten(at::TensorList params, at::TensorList lr, const at::Tensor& x_support,
                                 const at::Tensor& y_support, const at::Tensor& x_query, const at::Tensor& y_query,
                                 int64_t inner_steps, bool first_order, LossKind kind, int64_t first_adapted,
                                 bool compute_grad, bool compute_lr_grad);

}  // namespace metalearn_fast
