"""What the task-batched learners (MAML, Reptile) share: the model, the loss, its plan and the checks.

Both run a whole meta-batch of T tasks at once on per-task parameters ``[T, ...]`` (the meta
parameters expanded along a new leading task dimension, then updated per task), the way the model's
``ModelPlan`` (metalearn_fast/plan.py) says, chosen once in ``__init__``:

- "fused": an MLP with a built-in loss: the whole meta-step is one op (``ops.maml_mlp_loss``, and with
  torch.optim's Adam/AdamW/SGD ``ops.maml_mlp_meta_step_``, the optimizer's update included);
- "batched": any other stack of Linear(+ReLU) layers (``MLP``, ``SimpleNet``, ``nn.Sequential`` of
  ``nn.Linear``/``nn.ReLU``/``FusedLinearReLU``/``nn.Identity``), or an MLP with a callable loss: batched
  matrix products, ``ops.linear_relu`` per hidden layer, one ``ops.sgd_step`` per inner step;
- "module": any other ``nn.Module``, through ``torch.func.functional_call`` under ``torch.func.vmap`` over
  tasks.

Every plan gives the numbers of a per-task loop with ``torch.autograd.grad``. ``max_tasks_per_chunk`` bounds
the tasks any of them holds at once.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from .._checks import check_int
from ..plan import ModelPlan
from ..tasks import TaskBatch

LossArg = Union[str, Callable[[Tensor, Tensor], Tensor]]


def _mse_per_task(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each task: pred, target [T, K, ...] -> [T]."""
    return (pred - target).pow(2).flatten(1).mean(1)


def _cross_entropy_per_task(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of each task: logits [T, K, C], labels [T, K] int64 -> [T]."""
    tasks, examples, classes = logits.shape
    losses = F.cross_entropy(logits.reshape(tasks * examples, classes), labels.reshape(-1), reduction="none")
    return losses.view(tasks, examples).mean(1)


BUILTIN_LOSSES = {"mse": _mse_per_task, "cross_entropy": _cross_entropy_per_task}


def _head_indices(model: nn.Module, parameters: Sequence[Tensor]) -> list[int]:
    """Indices in ``parameters`` of the head: the parameters of the last submodule that owns any."""
    owners = [module for module in model.modules() if next(module.parameters(recurse=False), None) is not None]
    head = {id(p) for p in owners[-1].parameters(recurse=False)}
    return [i for i, p in enumerate(parameters) if id(p) in head]


def _check_normalization(model: nn.Module) -> None:
    """Batch statistics must be each task's own: running statistics, which one buffer keeps for the whole model,
    would mix the tasks of a meta-batch (and under vmap cannot be updated per task), so they are refused."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise ValueError(
                f"model.{name} ({type(module).__name__}) keeps running statistics, which would mix the tasks of a "
                "meta-batch; build it with track_running_stats=False: every forward pass then normalises with its "
                "own task's batch statistics, in the inner and the outer loop, as the MAML paper's models do")


class _TaskBatchedLearner(nn.Module):
    """What MAML and Reptile share: the model, the loss, its plan (metalearn_fast/plan.py) and the checks."""

    def __init__(self, model: nn.Module, loss: LossArg, max_tasks_per_chunk: Optional[int]) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise ValueError("model has no parameters to meta-learn")
        if isinstance(loss, str):
            if loss not in BUILTIN_LOSSES:
                names = ", ".join(map(repr, BUILTIN_LOSSES))
                raise ValueError(f"loss must be one of {names} or a callable, got {loss!r}")
            self._loss_fn = BUILTIN_LOSSES[loss]
        elif callable(loss):
            self._loss_fn = loss
        else:
            raise TypeError(f"loss must be 'mse', 'cross_entropy' or a callable, got {type(loss).__name__}")
        _check_normalization(model)
        self.model = model
        self.loss = loss
        # the structure is fixed here; the weights are read from the model on every call
        self.plan = ModelPlan(model, builtin_loss=isinstance(loss, str))
        self.max_tasks_per_chunk = (None if max_tasks_per_chunk is None
                                    else check_int("max_tasks_per_chunk", max_tasks_per_chunk, minimum=1))
        # under torch.distributed, the first meta_step gives every rank rank 0's weights
        self._weights_broadcast = False

    @property
    def uses_fast_path(self) -> bool:
        """True when the model is a Linear(+ReLU) stack that runs on the batched fast path (or the fused op)."""
        return self.plan.is_stack

    def _meta_parameters(self) -> list[Tensor]:
        return self.plan.parameters()

    def _fits_one_chunk(self, batch: TaskBatch) -> bool:
        """Whether max_tasks_per_chunk lets the whole batch run at once (then the fused ops may take it)."""
        return self.max_tasks_per_chunk is None or batch.num_tasks <= self.max_tasks_per_chunk

    def _broadcast_once(self) -> None:
        """Rank 0's parameters and buffers on every rank, before the first distributed update."""
        if not self._weights_broadcast:
            distributed.broadcast_parameters(self)
            self._weights_broadcast = True

    # ---- checks ----

    def _check_batch(self, batch: TaskBatch, first: Optional[Tensor] = None) -> None:
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch must be a metalearn_fast.TaskBatch, got {type(batch).__name__}")
        first = next(self.model.parameters()) if first is None else first
        self.plan.check_input(batch.x_support, "x_support", first)
        self.plan.check_input(batch.x_query, "x_query", first)

    def _check_labels(self, batch: TaskBatch, outputs: int, sets: int = 2) -> None:
        """Class labels of the first ``sets`` sets (support, query) must index the model's outputs: cross_entropy
        would index out of bounds (a device-side assert on CUDA)."""
        if self._loss_fn is _cross_entropy_per_task:
            for name, largest in list(zip(("y_support", "y_query"), batch.largest_labels))[:sets]:
                if largest >= outputs:
                    raise ValueError(f"{name} holds class label {largest} but the model has {outputs} outputs")

    def _task_losses(self, pred: Tensor, target: Tensor, target_name: str, largest_label: int) -> Tensor:
        """The loss of each task: pred [T, K, out], target [T, K, ...] -> [T]. largest_label: the largest class
        label in target (-1 for regression), known from where the data was checked."""
        self._check_target(pred.shape, target, target_name, largest_label)
        losses = self._loss_fn(pred, target)
        if not isinstance(losses, Tensor) or losses.shape != (pred.shape[0],):
            got = list(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss must return one loss per task, shape [{pred.shape[0]}], got {got}")
        return losses

    def _check_target(self, pred_shape: Sequence[int], target: Tensor, target_name: str, largest_label: int) -> None:
        """The built-in losses' demands on a target, for model outputs of shape pred_shape [T, K, out]."""
        pred_shape = list(pred_shape)
        if self._loss_fn is _mse_per_task:
            if not target.is_floating_point():
                raise ValueError(
                    f"loss='mse' needs floating-point targets but {target_name} holds class labels; "
                    "use loss='cross_entropy'"
                )
            if list(target.shape) != pred_shape:
                raise ValueError(
                    f"{target_name} must have the shape of the model's output {pred_shape}, got {list(target.shape)}"
                )
        elif self._loss_fn is _cross_entropy_per_task:
            if target.is_floating_point():
                raise ValueError(f"loss='cross_entropy' needs int64 class labels in {target_name}, got {target.dtype}")
            if len(pred_shape) != 3:
                raise ValueError(f"loss='cross_entropy' needs model outputs [T, K, classes], got {pred_shape}")
            if largest_label >= pred_shape[-1]:
                raise ValueError(
                    f"{target_name} holds class label {largest_label} but the model has {pred_shape[-1]} outputs")
