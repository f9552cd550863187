"""The MAML++ options of MAML: what "How to Train Your MAML" (Antoniou, Edwards and Storkey, ICLR 2019) adds.

Description
-----------
``StepOptions`` holds what the options learn and count, as a submodule of MAML (``maml.plus``), so that
``maml.parameters()`` and ``maml.state_dict()`` carry them:

- LSLR (``per_step_inner_lr``): one learned inner learning rate per adapted parameter tensor and per inner
  step, ``step_inner_lrs[j][k]``, initialised to ``inner_lr``;
- multi-step loss (``multi_step_loss``): the meta-loss is sum_k w_k * (query loss after inner step k+1).
  An integer N anneals the weights over the first N meta-steps as the paper does: they start equal (1/S each
  for S inner steps); each meta-step takes 1/(S*N) from every non-final weight (down to 0.03/S) and gives it to
  the last (up to 1 - 0.03*(S-1)/S); from meta-step N on only the last step's loss counts. A sequence of S
  non-negative weights summing to 1 fixes them;
- per-step BatchNorm (``per_step_bn``): every BatchNorm's weight and bias has one copy per inner step,
  ``step_norms``; inner step k (its support pass, and the query pass after it) runs with copy k. They are
  meta-learned, not adapted by the inner loop. The engine normalises with each task's batch statistics
  (running statistics are refused: they would mix the tasks), so there are no per-step running statistics;
- derivative-order annealing (``first_order_meta_steps``): first-order MAML for the first N meta-steps,
  second order after.

Steps past the S trained ones (``adapt(..., steps=10)`` after training 5) take ``inner_lr`` (learned rates are
learned for their own step: reused for ten steps, one trained for a single step can diverge) and step S-1's
BatchNorm copy.
Meta-steps are counted by ``MAML.meta_step`` (``taken``, kept in the state_dict); a loop that calls
``meta_loss`` itself calls ``maml.plus.advance()`` after each update. Cosine annealing of the meta learning
rate, the paper's last fix, is torch's own ``torch.optim.lr_scheduler.CosineAnnealingLR`` on the meta-optimizer.

References
----------
Antoniou, Edwards, Storkey. How to Train Your MAML. ICLR 2019. arXiv:1810.09502.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_int

MIN_WEIGHT = 0.03  # times 1/S: the floor of a non-final step's weight while the multi-step loss anneals


def job_options(meta_steps: int, batchnorm: bool) -> dict:
    """The MAML++ options as the jobs' --maml++ sets them, for a run of ``meta_steps``: every technique, the
    derivative order first order for the first third of meta-training (the paper switches after 50 of its 150
    epochs) and the multi-step loss annealed over the same third; per-step BatchNorm where the model has any."""
    third = max(1, meta_steps // 3)
    return dict(per_step_inner_lr=True, multi_step_loss=third, per_step_bn=batchnorm, first_order_meta_steps=third)


def batchnorm_indices(model: nn.Module, parameters: Sequence[Tensor]) -> list[int]:
    """Indices in ``parameters`` of every BatchNorm's weight and bias."""
    owned = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False)}
    return [i for i, p in enumerate(parameters) if id(p) in owned]


def _check_weights(weights, steps: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != steps:
        raise ValueError(f"multi_step_loss: {len(weights)} weights for {steps} inner steps; give one per step")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"multi_step_loss weights must be non-negative and sum to 1, got {weights}")
    return weights


class StepOptions(nn.Module):
    """The learned per-step values and the meta-step count of MAML's MAML++ options.

    Description: see the module docstring. Arguments: MAML's (its model's parameters, the indices the inner loop
    adapts, inner_lr, inner_steps, the options; norm_indices: the BatchNorm parameters' indices under per-step
    BatchNorm, else None). Example: ``MAML(model, per_step_inner_lr=True).plus``.
    References: Antoniou, Edwards, Storkey. How to Train Your MAML. ICLR 2019."""

    def __init__(self, parameters: Sequence[Tensor], adapted: Sequence[int], inner_lr: float, inner_steps: int,
                 per_step_inner_lr: bool, multi_step_loss: Union[None, int, Sequence[float]],
                 norm_indices: Optional[Sequence[int]], first_order_meta_steps: int) -> None:
        super().__init__()
        self.steps = inner_steps
        self.first_order_meta_steps = check_int("first_order_meta_steps", first_order_meta_steps, minimum=0)
        self.anneal_steps: Optional[int] = None
        self.fixed_weights: Optional[list[float]] = None
        if isinstance(multi_step_loss, bool):
            raise TypeError("multi_step_loss must be None, a number of meta-steps or a list of weights, got a bool")
        if isinstance(multi_step_loss, int):
            self.anneal_steps = check_int("multi_step_loss", multi_step_loss, minimum=1)
        elif multi_step_loss is not None:
            self.fixed_weights = _check_weights(multi_step_loss, inner_steps)
        self.step_inner_lrs: Optional[nn.ParameterList] = None
        if per_step_inner_lr:
            self.step_inner_lrs = nn.ParameterList([
                nn.Parameter(torch.full((inner_steps,), float(inner_lr), dtype=parameters[i].dtype,
                                        device=parameters[i].device)) for i in adapted])
        self.norm_indices = list(norm_indices or [])
        self.step_norms: Optional[nn.ParameterList] = None
        if norm_indices is not None:
            if not self.norm_indices:
                raise ValueError("per_step_bn=True needs a model with BatchNorm weights and biases, and this one has "
                                 "none")
            self.step_norms = nn.ParameterList([
                nn.Parameter(parameters[i].detach().expand(inner_steps, *parameters[i].shape).clone())
                for i in self.norm_indices])
        self.taken = 0

    def get_extra_state(self) -> dict:
        return {"taken": self.taken}

    def set_extra_state(self, state: dict) -> None:
        self.taken = int(state["taken"])

    def advance(self) -> None:
        """Count one meta-step (the schedules of the multi-step loss and of the derivative order read the count)."""
        self.taken += 1

    @property
    def multi_step(self) -> bool:
        return self.fixed_weights is not None or self.anneal_steps is not None

    def first_order_now(self, first_order: bool) -> bool:
        return first_order or self.taken < self.first_order_meta_steps

    def loss_weights(self) -> list[float]:
        """The weight of the query loss after each inner step at the current meta-step."""
        if self.fixed_weights is not None:
            return list(self.fixed_weights)
        steps = self.steps
        if self.anneal_steps is None or self.taken >= self.anneal_steps:
            return [0.0] * (steps - 1) + [1.0]
        decay = self.taken / (steps * self.anneal_steps)
        floor = MIN_WEIGHT / steps
        weights = [max(1 / steps - decay, floor) for _ in range(steps - 1)]
        return weights + [min(1 / steps + (steps - 1) * decay, 1 - (steps - 1) * floor)]

    def rates(self, step: int, default):
        """The inner rates of inner step ``step``: one 0-dim tensor per adapted parameter (LSLR), else (no LSLR, or a
        step past the trained ones) ``default``."""
        if self.step_inner_lrs is None or step >= self.steps:
            return default
        return [rates[step] for rates in self.step_inner_lrs]

    def with_norms(self, params: list[Tensor], step: int, tasks: int) -> list[Tensor]:
        """params (per-task [T, ...]) with every BatchNorm weight and bias replaced by inner step ``step``'s copy."""
        if self.step_norms is None:
            return params
        params = list(params)
        for i, norms in zip(self.norm_indices, self.step_norms):
            norm = norms[min(step, self.steps - 1)]
            params[i] = norm.expand(tasks, *norm.shape)
        return params
