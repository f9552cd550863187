"""torch.optim's Adam, AdamW and SGD as the fused ops apply them: on the optimizer's own state.

The fused training and meta-step ops (``ops.mlp_train_epoch_``, ``ops.maml_mlp_meta_step_``) end each
step with the optimizer's update, computed in C++ with torch's formulas on the tensors of
``optimizer.state``: ``step``, ``exp_avg`` and ``exp_avg_sq`` for Adam and AdamW, ``momentum_buffer`` for
SGD with momentum, created as torch creates them when absent. Afterwards ``optimizer.state_dict()``, a
following plain ``optimizer.step()``, a scheduler's change to ``param_groups[i]["lr"]`` and ``p.grad``
(the last gradient) are what a Python loop of ``backward()`` and ``optimizer.step()`` leaves.

``FusedUpdate.plan(optimizer, tensors)`` says whether an optimizer can be applied that way, and why not:
anything beyond torch.optim.Adam/AdamW/SGD with float hyperparameters (amsgrad, a tensor lr,
capturable or differentiable mode, step hooks, parameters outside ``tensors``) keeps the Python loop.
"""
from __future__ import annotations

import operator

from typing import Optional, Sequence, Union

import torch
import torch.optim.optimizer as optimizer_module
from torch import Tensor

__all__ = ["FusedUpdate"]

_ADAM_TYPES = (torch.optim.Adam, torch.optim.AdamW)


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives a new ``step`` tensor (float64 under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _reason_against(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> str:
    """Why the fused update cannot stand in for ``optimizer.step()`` on ``tensors`` ('' when it can)."""
    kind = type(optimizer)
    if kind not in (*_ADAM_TYPES, torch.optim.SGD):
        return f"the optimizer is {kind.__name__}; the fused update covers torch.optim.Adam, AdamW and SGD"
    if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
            or optimizer_module._global_optimizer_pre_hooks or optimizer_module._global_optimizer_post_hooks):
        return "the optimizer has step hooks"
    held = [p for group in optimizer.param_groups for p in group["params"]]
    if len(held) != len(tensors) or {id(p) for p in held} != {id(t) for t in tensors}:
        return "the optimizer does not hold exactly the tensors the fused step updates"
    first = tensors[0]
    if first.dtype not in (torch.float32, torch.float64):
        return f"the parameters are {first.dtype}; the fused update takes float32 and float64"
    if any(t.dtype != first.dtype or t.device != first.device or not t.is_contiguous() for t in tensors):
        return "the parameters differ in dtype or device, or are not contiguous"
    for group in optimizer.param_groups:
        numbers = ["lr", "weight_decay"] + (["eps"] if kind in _ADAM_TYPES else ["momentum", "dampening"])
        if any(not isinstance(group[name], (int, float)) for name in numbers):
            return "a hyperparameter is a tensor"
        if kind in _ADAM_TYPES:
            if group["amsgrad"]:
                return "amsgrad is on"
            if not all(isinstance(beta, (int, float)) for beta in group["betas"]):
                return "a beta is a tensor"
        if group.get("capturable") or group.get("differentiable"):
            return "the optimizer is capturable or differentiable"
    for p in tensors:
        state = optimizer.state.get(p)
        if state and kind in _ADAM_TYPES and (set(state) != {"step", "exp_avg", "exp_avg_sq"}
                                              or state["step"].device.type != "cpu"):
            return "the optimizer's state is not plain Adam state"
    return ""


class FusedUpdate:
    """The arguments that let a fused op apply ``optimizer``'s step to ``tensors`` (the op's order)."""

    def __init__(self, optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> None:
        self.optimizer = optimizer
        self.tensors = list(tensors)
        self.kind = "sgd" if type(optimizer) is torch.optim.SGD else "adam"
        self._decoupled = type(optimizer) is torch.optim.AdamW
        group_index = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self._groups = [group_index[id(t)] for t in self.tensors]
        self._kept = None  # see arguments()
        # the layout the plan was made for: a new param group makes it stale
        self.layout = _layout(optimizer)

    @classmethod
    def plan(cls, optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> Union["FusedUpdate", str]:
        """A FusedUpdate, or the reason (a sentence) why the Python optimizer must run instead."""
        reason = _reason_against(optimizer, tensors)
        return reason or cls(optimizer, tensors)

    def is_current(self, optimizer: torch.optim.Optimizer) -> bool:
        return optimizer is self.optimizer and _layout(optimizer) == self.layout

    def arguments(self) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """(grads, state, settings) for the op: each tensor's .grad (made when absent) and its optimizer
        state (made as torch makes it when absent), and its param group's settings.

        Once every state tensor exists, the .grad and state tensors are kept for the next call, as long as
        each tensor's .grad and optimizer.state entry are still the same objects (load_state_dict, or a user
        who sets .grad, replaces them); only the settings, which a scheduler may change, are read anew."""
        kept = self._kept
        optimizer = self.optimizer
        if kept is not None and kept[0] is optimizer.state and all(
                t.grad is g and optimizer.state.get(t) is d for t, g, d in zip(self.tensors, kept[1], kept[2])):
            group_settings = [self._group_settings(group) for group in optimizer.param_groups]
            return kept[1], kept[3], [v for i in self._groups for v in group_settings[i]]
        grads, state, settings = self._make_arguments()
        complete = self.kind == "adam" or all(settings[6::7])  # every momentum buffer exists
        self._kept = (optimizer.state, grads, [optimizer.state.get(t) for t in self.tensors], state) if complete \
            else None
        return grads, state, settings

    def _make_arguments(self) -> tuple[list[Tensor], list[Tensor], list[float]]:
        optimizer, groups = self.optimizer, self.optimizer.param_groups
        grads, state = [], []
        group_settings = [self._group_settings(group) for group in groups]
        settings: list[float] = []
        for tensor, group_index in zip(self.tensors, self._groups):
            grad = tensor.grad
            if grad is None or grad.shape != tensor.shape or not grad.is_contiguous() or grad.dtype != tensor.dtype:
                grad = tensor.grad = torch.empty_like(tensor, memory_format=torch.contiguous_format)
            grads.append(grad)
            values = group_settings[group_index]
            if self.kind == "adam":
                tensor_state = optimizer.state[tensor]
                if not tensor_state:
                    tensor_state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    tensor_state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
                    tensor_state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
                state += [tensor_state["step"], tensor_state["exp_avg"], tensor_state["exp_avg_sq"]]
            elif values[1] != 0:  # SGD with momentum (torch keeps no state without)
                buffer = optimizer.state[tensor].get("momentum_buffer")
                values = values[:6] + [float(buffer is not None)]
                state.append(torch.empty_like(tensor) if buffer is None else buffer)
            settings += values
        return grads, state, settings

    def finish(self, state: Sequence[Tensor]) -> None:
        """After the op: new momentum buffers into the optimizer's state, and the mark an LR scheduler reads
        to know that the optimizer stepped."""
        if self.kind == "sgd":
            buffers = iter(state)
            for tensor, group_index in zip(self.tensors, self._groups):
                if self.optimizer.param_groups[group_index]["momentum"] != 0:
                    self.optimizer.state[tensor]["momentum_buffer"] = next(buffers)
        if getattr(self.optimizer.step, "_wrapped_by_lr_sched", False):
            self.optimizer._opt_called = True

    def _group_settings(self, group: dict) -> list[float]:
        maximize = float(group["maximize"])
        if self.kind == "adam":
            decoupled = self._decoupled or group.get("decoupled_weight_decay", False)
            beta1, beta2 = group["betas"]
            return [float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                    float(group["weight_decay"]), float(decoupled), maximize]
        return [float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                float(group["weight_decay"]), float(group["nesterov"]), maximize, 1.0]


def _layout(optimizer: torch.optim.Optimizer) -> tuple:
    return tuple((id(group), len(group["params"])) for group in optimizer.param_groups)


class UpdateCache:
    """The FusedUpdate of the last optimizer asked about (or why there is none, a 'python: ...' sentence),
    made anew when the optimizer or its param groups change."""

    def __init__(self) -> None:
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._tensors: list[Tensor] = []
        self._layout: tuple = ()
        self._value: Union[FusedUpdate, str] = ""

    def get(self, optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> Union[FusedUpdate, str]:
        layout = _layout(optimizer)
        if (optimizer is not self._optimizer or layout != self._layout or len(tensors) != len(self._tensors)
                or not all(map(operator.is_, tensors, self._tensors))):
            update = FusedUpdate.plan(optimizer, tensors)
            self._optimizer, self._layout, self._tensors = optimizer, layout, list(tensors)
            self._value = update if isinstance(update, FusedUpdate) else f"python: {update}"
        return self._value
