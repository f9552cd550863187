// The optimizer update of one tensor in raw loops (float or double, contiguous), the CPU's form of
// composite/optimizer.cpp's ATen ops: the same formulas, each hyperparameter rounded to the tensor's
// dtype where torch passes it to an ATen op as a scalar. The options are template arguments, so that
// each loop has no branch inside and vectorises.
#pragma once
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "composite/optimizer.h"
#include "cpu/small_kernels.h"

namespace metalearn_fast {
// The loops for the CPU's instruction sets: the portable copy, and under the target regions of small_kernels.h the
// AVX2 and AVX-512 copies (a meta-step's Adam update of the sinusoid's 1 761 numbers: 1.45 us in the portable SSE
// loop, 0.69 in AVX-512's), chosen per call by cpu_simd().
namespace optimizer_loops {
#include "cpu/optimizer_loops_impl.h"
}  // namespace optimizer_loops

#ifdef METALEARN_FAST_SMALL_KERNELS
namespace optimizer_loops_avx2 {
METALEARN_FAST_BEGIN_AVX2
#include "cpu/optimizer_loops_impl.h"
METALEARN_FAST_END_AVX2
}  // namespace optimizer_loops_avx2

namespace optimizer_loops_avx512 {
METALEARN_FAST_BEGIN_AVX512
#include "cpu/optimizer_loops_impl.h"
METALEARN_FAST_END_AVX512
}  // namespace optimizer_loops_avx512
#endif

// Updates elements [begin, end) of param by grad; state1/state2: exp_avg/exp_avg_sq (Adam) or
// momentum_buffer (SGD with momentum, state2 unused). step: Adam's step count after its increment.
template <typename T>
void update_tensor(OptimizerKind kind, const ParamUpdate& u, T* param, const T* grad, T* state1, T* state2,
                   int64_t begin, int64_t end, double step) {
#ifdef METALEARN_FAST_SMALL_KERNELS
  if (cpu_simd() == CpuSimd::kAvx512) {
    return optimizer_loops_avx512::update_tensor(kind, u, param, grad, state1, state2, begin, end, step);
  }
  if (cpu_simd() == CpuSimd::kAvx2) {
    return optimizer_loops_avx2::update_tensor(kind, u, param, grad, state1, state2, begin, end, step);
  }
#endif
  optimizer_loops::update_tensor(kind, u, param, grad, state1, state2, begin, end, step);
}

// Tensor i's optimizer state in the op's state list, as update_tensor takes it: Adam's step tensor counted
// up (the new count returned), its exp_avg and exp_avg_sq; SGD's momentum buffer, or none.
template <typename T>
struct TensorState {
  double step;
  T* state1;
  T* state2;
};

template <typename T>
TensorState<T> tensor_state(const OptimizerUpdate& update, at::TensorList state, size_t i) {
  const ParamUpdate& u = update.params[i];
  const bool adam = update.kind == OptimizerKind::kAdam;
  const double step = adam ? increment_step(state[u.state]) : 0;
  const int64_t first = adam ? u.state + 1 : u.state;
  T* state1 = update.state_count(i) > (adam ? 1 : 0) ? state[first].mutable_data_ptr<T>() : nullptr;
  T* state2 = adam ? state[first + 1].mutable_data_ptr<T>() : nullptr;
  return {step, state1, state2};
}

// Whether raw_optimizer_update can run the update: float or double, one dtype, every tensor contiguous.
bool raw_loops_apply(at::TensorList params, at::TensorList grads, at::TensorList state);

// optimizer_step_'s update in raw loops (raw_loops_apply holds, T the dtype): tensor by tensor, a large one split
// across the threads, a small one run in this thread.
template <typename T>
void raw_optimizer_update(const OptimizerUpdate& update, at::TensorList params, at::TensorList grads,
                          at::TensorList state) {
  constexpr int64_t kGrain = 1 << 15;  // elements per thread at least
  for (size_t i = 0; i < params.size(); ++i) {
    const ParamUpdate& u = update.params[i];
    const TensorState<T> t = tensor_state<T>(update, state, i);
    T* param = params[i].mutable_data_ptr<T>();
    const T* grad = grads[i].const_data_ptr<T>();
    at::parallel_for(0, params[i].numel(), kGrain, [&](int64_t begin, int64_t end) {
      update_tensor<T>(update.kind, u, param, grad, t.state1, t.state2, begin, end, t.step);
    });
  }
}

}  // namespace metalearn_fast
