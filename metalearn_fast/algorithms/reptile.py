"""Reptile (Nichol, Achiam and Schulman, 2018), on the task-batched engine."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import distributed
from .._checks import check_int, check_positive
from ..ops import reptile_mlp_step_, sgd_step_
from ..tasks import TaskBatch
from .task_batched import LossArg, _TaskBatchedLearner

__all__ = ["Reptile"]


class Reptile(_TaskBatchedLearner):
    """Reptile: first-order meta-learning without a query set.

    Description
    -----------
    Adapts a copy of the weights to each task of the batch with plain SGD, then moves the model toward their
    mean: theta <- theta + outer_lr * (mean_t theta_t - theta). Uses only the support sets of a TaskBatch; an MLP
    with a built-in loss runs the whole step as one op (ops.reptile_mlp_step_).

    Arguments
    ---------
    model: any nn.Module. inner_lr, inner_steps: the per-task SGD. outer_lr: the step toward the mean.
    loss: as for MAML. max_tasks_per_chunk: None, or at most N tasks' copies held at once (the same update).

    Example
    -------
    >>> reptile = Reptile(MLP([1, 40, 40, 1]), inner_lr=0.02, inner_steps=5, outer_lr=0.1)
    >>> loss = reptile.meta_step(tasks.sample(10))   # updates the model in place

    References
    ----------
    Nichol, Achiam, Schulman. On First-Order Meta-Learning Algorithms. arXiv:1803.02999, 2018.
    """

    def __init__(self, model: nn.Module, inner_lr: float, inner_steps: int, outer_lr: float, loss: LossArg = "mse",
                 max_tasks_per_chunk: Optional[int] = None) -> None:
        super().__init__(model, loss, max_tasks_per_chunk)
        self.inner_lr = check_positive("inner_lr", inner_lr)
        self.inner_steps = check_int("inner_steps", inner_steps, minimum=1)
        self.outer_lr = check_positive("outer_lr", outer_lr)

    def extra_repr(self) -> str:
        return f"inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, outer_lr={self.outer_lr}, plan={self.plan.kind}"

    def meta_step(self, batch: TaskBatch) -> Tensor:
        """One Reptile update of the model's weights, in place. Returns the mean over tasks of the support
        loss at the weights before the update (that is, at the first inner step), a detached 0-dim tensor.

        Under a torch.distributed process group of more than one process, ``batch`` is this rank's shard
        of the meta-batch: the mean of the adapted weights is taken over all ranks' tasks (each rank weighted
        by its task count), so every rank makes the update of one process on the whole batch, and the
        returned loss is the mean over all tasks. The first call broadcasts rank 0's parameters and buffers.
        If this step raises on any rank, it raises a RuntimeError naming that rank on every rank, and no
        rank's weights change.
        """
        if distributed.is_distributed():
            return self._distributed_meta_step(batch)
        if self.plan.kind == "fused" and self._fits_one_chunk(batch):
            return self._fused_meta_step(batch)
        support_loss, means = self._mean_adapted(batch)
        with torch.no_grad():
            for p, mean in zip(self._meta_parameters(), means):
                p.add_(self.outer_lr * (mean - p))
        return support_loss

    def meta_step_path(self) -> str:
        """How ``meta_step`` runs: "fused" (one C++ call, ops.reptile_mlp_step_) or "python: <why not>"."""
        if distributed.is_distributed():
            return "python: the adapted weights are averaged over the ranks before the update"
        if self.plan.kind != "fused":
            return "python: the model is not an MLP with a built-in loss"
        if self.max_tasks_per_chunk is None:
            return "fused"
        return f"fused for meta-batches of up to {self.max_tasks_per_chunk} tasks, else in chunks of that many"

    def _fused_meta_step(self, batch: TaskBatch) -> Tensor:
        """meta_step as one op: every task's inner loop and the update, ops.reptile_mlp_step_."""
        params = self._meta_parameters()
        self._check_batch(batch, params[0])
        self._check_labels(batch, params[-2].shape[0], sets=1)
        with torch.no_grad():
            loss = reptile_mlp_step_(params, batch.x_support, batch.y_support, self.inner_steps, self.inner_lr,
                                     self.outer_lr, self.loss)
        return loss

    def _mean_adapted(self, batch: TaskBatch) -> tuple[Tensor, list[Tensor]]:
        """The mean support loss at the first inner step (0-dim) and each parameter's mean over the tasks of its
        adapted copies, in chunks of at most max_tasks_per_chunk tasks (peak memory: one chunk's copies)."""
        loss, means = None, None
        for chunk in batch.chunks(self.max_tasks_per_chunk):
            task_params, chunk_loss = self._adapt_copies(chunk)
            share = chunk.num_tasks / batch.num_tasks
            parts = [adapted.mean(0) * share for adapted in task_params]
            loss = chunk_loss * share if loss is None else loss + chunk_loss * share
            means = parts if means is None else [m + part for m, part in zip(means, parts)]
        return loss, means

    def _adapt_copies(self, batch: TaskBatch) -> tuple[list[Tensor], Tensor]:
        """Each task's adapted copy of the weights ([T, ...] per parameter) and the mean support loss at the
        first inner step (0-dim)."""
        self._check_batch(batch)
        tasks = batch.num_tasks
        # each task's own copy of the weights, updated in place by sgd_step_
        task_params = [p.detach().expand(tasks, *p.shape).clone().requires_grad_() for p in self._meta_parameters()]
        support_loss = None
        for step in range(self.inner_steps):
            with torch.enable_grad():
                losses = self._task_losses(self.plan.forward(task_params, batch.x_support), batch.y_support,
                                           "y_support", batch.largest_labels[0])
                # the sum, not the mean: each task's copy gets the gradient of its own loss
                grads = torch.autograd.grad(losses.sum(), task_params)
            if step == 0:
                support_loss = losses.detach().mean()
            with torch.no_grad():
                sgd_step_(task_params, grads, self.inner_lr)
        return task_params, support_loss

    def _distributed_meta_step(self, batch: TaskBatch) -> Tensor:
        """meta_step on this rank's shard, moving toward the mean adapted weights over all ranks' tasks."""
        self._broadcast_once()
        meta = self._meta_parameters()

        def local_mean_weights():
            return batch.num_tasks, *self._mean_adapted(batch)

        loss, means = distributed._weighted_mean_over_ranks(local_mean_weights, meta, "Reptile.meta_step")
        with torch.no_grad():
            for p, mean in zip(meta, means):
                p.add_(self.outer_lr * (mean - p))
        return loss
