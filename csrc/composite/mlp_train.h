// mlp_train_epoch_: one epoch of minibatch training of an MLP (Linear+ReLU layers, plain Linear last)
// in one call: per batch the forward pass, the loss (mean MSE, or mean cross-entropy), the backward
// pass into the parameters' .grad tensors, and the optimizer update of composite/optimizer.h on the
// parameters and the optimizer's state. Returns the loss of every batch.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "composite/maml_mlp.h"
#include "composite/optimizer.h"

namespace metalearn_fast {

struct TrainBatches {
  int64_t examples;  // N
  int64_t size;      // batch_size
  int64_t count;     // ceil(N / batch_size); the last batch may be partial

  int64_t rows(int64_t batch) const { return std::min(size, examples - batch * size); }
};

// The arguments checked (ValueError / TypeError naming them); returns the loss kind and the batches.
std::pair<LossKind, TrainBatches> check_mlp_train_args(at::TensorList params, at::TensorList grads,
                                                       const at::Tensor& x, const at::Tensor& y,
                                                       const std::optional<at::Tensor>& order, int64_t batch_size,
                                                       c10::string_view loss);

// The epoch in ATen ops (any device), arguments already checked.
at::Tensor mlp_train_epoch_aten(at::TensorList params, at::TensorList grads, at::TensorList state, const at::Tensor& x,
                                const at::Tensor& y, const std::optional<at::Tensor>& order, LossKind kind,
                                const TrainBatches& batches, OptimizerUpdate update);

}  // namespace metalearn_fast
