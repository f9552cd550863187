// sgd_step on CUDA: new = p - lr * g for every tensor of the meta-batch in one kernel launch.
// The tensors of a meta-batch are many and small (a bias of 25 x 40), so a launch per tensor would be
// dominated by launch latency; one grid-stride loop over the concatenation of all of them is not.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "checks.h"
#include "kernel_common.h"

namespace metalearn_fast {
namespace {

// The table of tensors travels by value as the kernel's argument rather than through a device buffer: an
// argument costs nothing extra at launch, while a device table needs a host-to-device copy per call (and a
// pinned staging buffer kept alive until that copy has run). Kernel arguments are portably limited to 4 KB,
// so a launch carries at most kMaxTensorsPerLaunch tensors (3 KB of entries) and longer lists take several
// launches. A meta-batch MLP has a handful of tensors, so in practice it is one launch.
constexpr int kMaxTensorsPerLaunch = 48;
constexpr int kThreads = 256;

template <typename scalar_t>
struct SgdEntry {
  const scalar_t* param;
  const scalar_t* grad;
  const scalar_t* lr;
  scalar_t* out;  // may equal param (in place)
  int64_t begin;  // this tensor's [begin, end) in the launch's flattened element space
  int64_t end;
  int64_t div;  // element e uses lr[(e / div) % mod], see LrLayout
  int64_t mod;
};

template <typename scalar_t>
struct SgdBatch {
  SgdEntry<scalar_t> entries[kMaxTensorsPerLaunch];
  int64_t total;  // end of the last entry
};

static_assert(sizeof(SgdBatch<double>) <= 4000, "sgd_step: the kernel argument must stay under 4 KB");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sgd_step_kernel(const SgdBatch<scalar_t> batch) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // A thread's flat indices only grow, so its entry cursor only moves forward: finding the tensor costs
  // at most one pass over the table per thread, not a search per element. Empty tensors (begin == end)
  // are stepped over by the same loop.
  int k = 0;
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < batch.total;
       flat += step) {
    while (flat >= batch.entries[k].end) ++k;
    const SgdEntry<scalar_t>& entry = batch.entries[k];
    const int64_t e = flat - entry.begin;
    int64_t r = 0;
    if (entry.mod != 1) {
      // 64-bit division is emulated in tens of instructions; 32 bits suffice below 2^32 elements.
      if (entry.end - entry.begin <= static_cast<int64_t>(UINT32_MAX)) {
        r = (static_cast<uint32_t>(e) / static_cast<uint32_t>(entry.div)) % static_cast<uint32_t>(entry.mod);
      } else {
        r = (e / entry.div) % entry.mod;
      }
    }
    const opmath_t p = static_cast<opmath_t>(entry.param[e]);
    const opmath_t g = static_cast<opmath_t>(entry.grad[e]);
    const opmath_t lr = static_cast<opmath_t>(entry.lr[r]);
    entry.out[e] = static_cast<scalar_t>(p - lr * g);
  }
}

template <typename scalar_t>
void launch_sgd_step(const SgdBatch<scalar_t>& batch, int64_t max_blocks, cudaStream_t stream) {
  if (batch.total == 0) return;
  const int64_t blocks = std::min<int64_t>((batch.total + kThreads - 1) / kThreads, max_blocks);
  sgd_step_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Writes params[i] - lr[i] * grads[i] into outs[i] (contiguous; may be params[i] itself).
void sgd_step_into(at::TensorList params, at::TensorList grads, at::TensorList lr, at::TensorList outs) {
  const size_t n = params.size();
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Enough resident blocks to saturate memory bandwidth; beyond that the grid-stride loop takes over.
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * (2048 / kThreads);
  // Contiguous copies must outlive the launches that read them; the caching allocator orders their reuse
  // after this stream's work, so dropping them when this function returns is safe.
  std::vector<at::Tensor> keep;
  keep.reserve(3 * n);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_cuda", [&] {
    SgdBatch<scalar_t> batch{};
    int count = 0;
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& rate = lr[lr.size() == 1 ? 0 : i];
      const LrLayout layout = lr_layout(params[i], rate, i);
      keep.push_back(params[i].contiguous());
      const scalar_t* p = keep.back().const_data_ptr<scalar_t>();
      keep.push_back(grads[i].contiguous());
      const scalar_t* g = keep.back().const_data_ptr<scalar_t>();
      keep.push_back(rate.contiguous());
      const scalar_t* r = keep.back().const_data_ptr<scalar_t>();
      const int64_t numel = params[i].numel();
      batch.entries[count] = {p, g, r, outs[i].mutable_data_ptr<scalar_t>(), total, total + numel, layout.div,
                              layout.mod};
      total += numel;
      ++count;
      if (count == kMaxTensorsPerLaunch || i + 1 == n) {
        batch.total = total;
        launch_sgd_step(batch, max_blocks, stream);
        batch = SgdBatch<scalar_t>{};
        count = 0;
        total = 0;
      }
    }
  });
}

std::vector<at::Tensor> sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  check_sgd_step_args(params, grads, lr);
  return update_out_of_place(params, [&](at::TensorList current, at::TensorList outs) {
    sgd_step_into(current, grads, lr, outs);
  });
}

void sgd_step_inplace_cuda(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  check_sgd_step_args(params, grads, lr);
  update_in_place(params, [&](at::TensorList current, at::TensorList outs) { sgd_step_into(current, grads, lr, outs); });
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CUDA, m) {
  m.impl("sgd_step", &sgd_step_cuda);
  m.impl("sgd_step_", &sgd_step_inplace_cuda);
}

}  // namespace metalearn_fast
