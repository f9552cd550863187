// sgd_step on the CPU: new = p - lr * g for every tensor of the meta-batch in one parallel loop.
// The tensors of a meta-batch are many and small (a bias of 25 x 40), so one parallel_for over
// (tensor, chunk) pairs replaces a loop of tiny ATen calls, each with its own dispatch and thread wake-up.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "kernel_common.h"

namespace metalearn_fast {
namespace {

constexpr int64_t kChunk = 16384;

struct Piece {
  size_t tensor;
  int64_t begin;
  int64_t end;
};

template <typename scalar_t>
void sgd_update(const std::vector<const scalar_t*>& params, const std::vector<const scalar_t*>& grads,
                const std::vector<const scalar_t*>& rates, const std::vector<LrLayout>& layouts,
                const std::vector<scalar_t*>& outs, const std::vector<Piece>& pieces) {
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Piece& piece = pieces[k];
      const scalar_t* p = params[piece.tensor];
      const scalar_t* g = grads[piece.tensor];
      const scalar_t* r = rates[piece.tensor];
      scalar_t* o = outs[piece.tensor];
      const LrLayout layout = layouts[piece.tensor];
      if (layout.mod == 1) {
        const scalar_t lr = r[0];
        for (int64_t e = piece.begin; e < piece.end; ++e) o[e] = p[e] - lr * g[e];
      } else if (layout.div == 1) {
        for (int64_t e = piece.begin; e < piece.end; ++e) o[e] = p[e] - r[e % layout.mod] * g[e];
      } else {
        for (int64_t e = piece.begin; e < piece.end; ++e) o[e] = p[e] - r[(e / layout.div) % layout.mod] * g[e];
      }
    }
  });
}

// Writes params[i] - lr[i] * grads[i] into outs[i] (which may be params[i] itself).
void sgd_step_into(at::TensorList params, at::TensorList grads, at::TensorList lr, at::TensorList outs) {
  const size_t n = params.size();
  const at::ScalarType dtype = params[0].scalar_type();
  std::vector<at::Tensor> keep;  // contiguous copies stay alive while the raw pointers are used
  keep.reserve(3 * n);
  std::vector<LrLayout> layouts(n);
  std::vector<Piece> pieces;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& rate = lr[lr.size() == 1 ? 0 : i];
    layouts[i] = lr_layout(params[i], rate, i);
    for (int64_t b = 0; b < params[i].numel(); b += kChunk) {
      pieces.push_back({i, b, std::min(b + kChunk, params[i].numel())});
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "sgd_step_cpu", [&] {
    std::vector<const scalar_t*> p(n), g(n), r(n);
    std::vector<scalar_t*> o(n);
    for (size_t i = 0; i < n; ++i) {
      keep.push_back(params[i].contiguous());
      keep.push_back(grads[i].contiguous());
      keep.push_back(lr[lr.size() == 1 ? 0 : i].contiguous());
      p[i] = keep[3 * i].const_data_ptr<scalar_t>();
      g[i] = keep[3 * i + 1].const_data_ptr<scalar_t>();
      r[i] = keep[3 * i + 2].const_data_ptr<scalar_t>();
      o[i] = outs[i].mutable_data_ptr<scalar_t>();
    }
    sgd_update<scalar_t>(p, g, r, layouts, o, pieces);
  });
}

std::vector<at::Tensor> sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  check_sgd_step_args(params, grads, lr);
  return update_out_of_place(params, [&](at::TensorList current, at::TensorList outs) {
    sgd_step_into(current, grads, lr, outs);
  });
}

void sgd_step_inplace_cpu(at::TensorList params, at::TensorList grads, at::TensorList lr) {
  check_sgd_step_args(params, grads, lr);
  update_in_place(params, [&](at::TensorList current, at::TensorList outs) { sgd_step_into(current, grads, lr, outs); });
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CPU, m) {
  m.impl("sgd_step", &sgd_step_cpu);
  m.impl("sgd_step_", &sgd_step_inplace_cpu);
}

}  // namespace metalearn_fast
