// optimizer_step_ on the CPU: each tensor's update in one pass of raw loops (cpu/optimizer_cpu.h)
// instead of the seven-odd ATen ops (and temporaries) per tensor that torch.optim runs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "composite/optimizer.h"
#include "cpu/optimizer_cpu.h"

namespace metalearn_fast {

bool raw_loops_apply(at::TensorList params, at::TensorList grads, at::TensorList state) {
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].scalar_type() != dtype || !params[i].is_contiguous() || !grads[i].is_contiguous()) return false;
  }
  for (size_t k = 0; k < state.size(); ++k) {
    if (!state[k].is_contiguous()) return false;
  }
  return true;
}

namespace {

void optimizer_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state, c10::string_view optimizer,
                        c10::ArrayRef<double> settings) {
  const OptimizerUpdate update = parse_optimizer("optimizer_step_", optimizer, settings, params, grads, state);
  if (params.empty()) return;
  if (!raw_loops_apply(params, grads, state)) return optimizer_update_aten(update, params, grads, state);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "optimizer_step_cpu", [&] {
    raw_optimizer_update<scalar_t>(update, params, grads, state);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) { m.impl("optimizer_step_", &optimizer_step_cpu); }

}  // namespace metalearn_fast
