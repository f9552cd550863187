"""TaskBatch: a meta-batch of T few-shot tasks, each with a support set and a query set."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

__all__ = ["TaskBatch", "check_task_set"]


def check_task_set(x: Tensor, y: Tensor, x_name: str, y_name: str) -> None:
    """Check one set of examples for T tasks: x [T, K, ...] floating point, y [T, K, ...] of x's dtype
    (regression) or y [T, K] int64 class labels >= 0 (classification); T >= 1, K >= 1, all finite, one device.

    Raises TypeError for a non-tensor or a wrong dtype and ValueError for anything else, naming the argument.
    """
    for name, tensor in ((x_name, x), (y_name, y)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{x_name} must be floating point, got {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"{x_name} must be [T, K, features...], got shape {list(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} holds no tasks (T = 0): the batch is empty")
    if x.shape[1] == 0:
        raise ValueError(f"{x_name} holds no examples per task (K = 0)")
    if y.device != x.device:
        raise ValueError(f"{y_name} must be on {x_name}'s device {x.device}, got {y.device}")
    if y.dim() < 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{y_name} must be [T, K, ...] with T = {x.shape[0]} tasks like {x_name}, got shape {list(y.shape)}"
        )
    if y.shape[1] != x.shape[1]:
        raise ValueError(
            f"{y_name} must hold one target per example of {x_name} (K = {x.shape[1]}), got shape {list(y.shape)}"
        )
    if y.is_floating_point():
        if y.dtype != x.dtype:
            raise TypeError(
                f"{y_name} holds regression targets, so it must have {x_name}'s dtype {x.dtype}, got {y.dtype}"
            )
        if not torch.isfinite(y).all():
            raise ValueError(f"{y_name} contains NaN or infinite values")
    elif y.dtype == torch.int64:
        if y.dim() != 2:
            raise ValueError(f"{y_name} holds class labels, so it must be [T, K], got shape {list(y.shape)}")
        if (y < 0).any():
            raise ValueError(f"{y_name} holds class labels, which must be non-negative")
    else:
        raise TypeError(
            f"{y_name} must be floating point (regression) or int64 class labels (classification), got {y.dtype}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{x_name} contains NaN or infinite values")


@dataclass(frozen=True, eq=False)
class TaskBatch:
    """T tasks, each with K support and Q query examples, checked on construction.

    x_support: [T, K, ...], y_support: [T, K, ...] (regression) or [T, K] int64 (class labels);
    x_query: [T, Q, ...], y_query: [T, Q, ...] or [T, Q]. Support and query share T, the feature
    shape of x, the dtype of x, the kind of y (and its trailing shape for regression) and the device.
    """

    x_support: Tensor
    y_support: Tensor
    x_query: Tensor
    y_query: Tensor

    def __post_init__(self) -> None:
        check_task_set(self.x_support, self.y_support, "x_support", "y_support")
        check_task_set(self.x_query, self.y_query, "x_query", "y_query")
        support, query = self.x_support, self.x_query
        if query.shape[0] != support.shape[0]:
            raise ValueError(f"x_query has T = {query.shape[0]} tasks but x_support has T = {support.shape[0]}")
        if query.shape[2:] != support.shape[2:]:
            raise ValueError(
                f"x_query must have the feature shape {list(support.shape[2:])} of x_support, "
                f"got shape {list(query.shape)}"
            )
        if query.dtype != support.dtype:
            raise TypeError(f"x_query must have x_support's dtype {support.dtype}, got {query.dtype}")
        if query.device != support.device:
            raise ValueError(f"x_query must be on x_support's device {support.device}, got {query.device}")
        if self.y_query.dtype != self.y_support.dtype:
            raise TypeError(f"y_query must have y_support's dtype {self.y_support.dtype}, got {self.y_query.dtype}")
        if self.y_support.is_floating_point() and self.y_query.shape[2:] != self.y_support.shape[2:]:
            raise ValueError(
                f"y_query must have the target shape {list(self.y_support.shape[2:])} of y_support, "
                f"got shape {list(self.y_query.shape)}"
            )

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.x_support.shape[0]

    @property
    def is_classification(self) -> bool:
        """True when y holds int64 class labels, False when it holds regression targets."""
        return not self.y_support.is_floating_point()

    def to(self, device: Union[str, torch.device]) -> "TaskBatch":
        """The same batch on ``device``."""
        return TaskBatch(*(t.to(device) for t in (self.x_support, self.y_support, self.x_query, self.y_query)))
