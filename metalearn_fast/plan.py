"""How the engine runs a model: one analysis of its structure, made once, for MAML, Reptile, pretrain and adapt.

Three strategies, best first:

- ``"fused"``: an MLP (Linear layers with a ReLU after every hidden one) with a built-in loss: a whole
  meta-step (MAML, Reptile) or training epoch (pretrain, adapt) is one op of ``metalearn_fast.ops``;
- ``"batched"``: any other Linear(+ReLU) stack, or an MLP with a callable loss: every task at once as batched
  matrix products (``ops.linear_relu`` per hidden layer, ``torch.baddbmm`` for the others);
- ``"module"``: any other ``nn.Module``, through ``torch.func.functional_call`` under ``torch.func.vmap``
  over tasks, or a loop over tasks when the model cannot run under vmap.

Which modules are stacks is decided by ``nn.linear_stack`` alone (the modules expose their layers).
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .nn import linear_stack
from .ops import linear_relu

__all__ = ["ModelPlan"]


class ModelPlan:
    """The strategy for ``model`` (see the module docstring) and the forward pass on per-task parameters.

    builtin_loss: whether the loss is one the fused ops compute ("mse", "cross_entropy").
    """

    def __init__(self, model: nn.Module, builtin_loss: bool) -> None:
        layers = linear_stack(model)
        self.model = model
        self.parameter_names = [name for name, _ in model.named_parameters()]
        # the modules in model.parameters() order (parameters() reads their parameters on every call)
        self._modules = list(model.modules())
        self._own_walk = type(model).parameters is nn.Module.parameters
        # per layer of a stack, whether a ReLU follows it; None for any other module
        self.relu_after: Optional[list[bool]] = None if layers is None else [relu for _, _, relu in layers]
        self.is_mlp = layers is not None and all(self.relu_after[:-1])
        self.kind = "module" if layers is None else "fused" if self.is_mlp and builtin_loss else "batched"
        self._uses_vmap = True
        # the module path's meta-loss under torch.func (vmap of grad) until the model shows it cannot run there
        self.uses_func_grad = self.kind == "module"
        self._func_model: Optional[nn.Module] = None

    def parameters(self) -> list[Tensor]:
        """list(model.parameters()) of the model's current parameters, read from the modules that hold them
        (a fifth of the time of Module.parameters' generators: it runs at every meta-step)."""
        if not self._own_walk:
            return list(self.model.parameters())
        found = [p for module in self._modules for p in module._parameters.values() if p is not None]
        if len(set(map(id, found))) < len(found):  # a parameter shared by two modules once, as parameters() gives it
            found = list({id(p): p for p in found}.values())  # (by id: a tensor's hash is a Python call)
        return found

    @property
    def is_stack(self) -> bool:
        return self.relu_after is not None

    def head_layer(self) -> int:
        """The index of a stack's last layer."""
        return len(self.relu_after) - 1

    def check_input(self, x: Tensor, name: str, first: Tensor) -> None:
        """x [T, N, ...] must have the dtype and device of the model's first parameter ``first`` (and, for a
        stack, its input size)."""
        if x.dtype != first.dtype:
            raise TypeError(f"{name} must have the model's dtype {first.dtype}, got {x.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name} must be on the model's device {first.device}, got {x.device}")
        if self.is_stack and (x.dim() != 3 or x.shape[-1] != first.shape[1]):
            raise ValueError(f"{name} must be [T, N, {first.shape[1]}] for this model, got shape {list(x.shape)}")

    def check_adapted(self, adapted: list[Tensor], x: Tensor, parameters: Sequence[Tensor]) -> None:
        """adapted: per-task parameters [T, *p.shape] for each of the model's ``parameters``; x: [T, Q, ...]."""
        if len(adapted) != len(parameters) or any(a.shape[1:] != p.shape for a, p in zip(adapted, parameters)):
            raise ValueError("adapted must be the list returned by adapt(): one [T, *p.shape] tensor per parameter")
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self.check_input(x, "x", parameters[0])
        if x.dim() < 2 or x.shape[0] != adapted[0].shape[0]:
            raise ValueError(f"x must be [T, Q, ...] with T = {adapted[0].shape[0]} tasks like adapted, got "
                             f"{list(x.shape)}")

    def forward(self, params: Sequence[Tensor], x: Tensor, first_layer: int = 0) -> Tensor:
        """The model on each task's parameters: params [T, ...] in model.parameters() order (for a stack, those
        of layers first_layer.. only), x [T, N, ...] -> [T, N, out]."""
        if self.is_stack:
            return self._stack_forward(params, x, first_layer)
        return self._module_forward(params, x)

    def shared_body(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """A stack's layers before the head on weights every task shares (ANIL's body): params [T, ...] per
        parameter, equal across tasks, x [T, N, I] -> features [T, N, H], one matrix product per layer."""
        tasks, examples = x.shape[:2]
        h = x.reshape(tasks * examples, -1)
        for relu, weight, bias in zip(self.relu_after[: self.head_layer()], params[0::2], params[1::2]):
            weight, bias = weight[0], bias[0]
            h = linear_relu(h, weight, bias) if relu else torch.addmm(bias, h, weight.t())
        return h.reshape(tasks, examples, -1)

    def _stack_forward(self, params: Sequence[Tensor], h: Tensor, first_layer: int) -> Tensor:
        for relu, weight, bias in zip(self.relu_after[first_layer:], params[0::2], params[1::2]):
            if relu:
                h = linear_relu(h, weight, bias)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return h

    def func_model(self) -> nn.Module:
        """The model as torch.func.grad runs it under vmap: a copy with every BatchNorm written in plain ops
        (torch's fused batch_norm has wrong second derivatives under vmap: 4e-3 of 1.6 on torch 2.14.1), the
        model itself when it has none. Called with the model's own parameters and buffers
        (functional_call), so the copy's are never read."""
        if self._func_model is None:
            norms = [name for name, m in self.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self._func_model = copy.deepcopy(self.model) if norms else self.model
            for name in norms:
                parent, _, child = name.rpartition(".")
                owner = self._func_model.get_submodule(parent)
                setattr(owner, child, _BatchNormFromOps(owner.get_submodule(child)))
        return self._func_model

    def _module_forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        def run_task(task_params, task_x):
            return torch.func.functional_call(self.model, dict(zip(self.parameter_names, task_params)), (task_x,))

        if self._uses_vmap:
            try:
                return torch.func.vmap(run_task)(list(params), x)
            except Exception as vmap_error:
                reason = f"{type(vmap_error).__name__}: {vmap_error}"
        try:
            out = torch.stack([run_task([p[t] for p in params], x[t]) for t in range(x.shape[0])])
        except Exception as error:
            raise TypeError(
                f"model could not run on per-task parameters through torch.func.functional_call: "
                f"{type(error).__name__}: {error}"
            ) from error
        if self._uses_vmap:
            # vmap failed where a plain loop works, so the model itself cannot run under vmap
            self._uses_vmap = False
            warnings.warn(
                f"the model does not run under torch.func.vmap ({reason}); running its tasks one by one instead "
                "(same results, slower)",
                RuntimeWarning,
                stacklevel=4,
            )
        return out


class _BatchNormFromOps(nn.Module):
    """A BatchNorm of a batch's own statistics (no running statistics) in plain ops, so that torch.func
    differentiates it twice correctly under vmap. Holds the norm's own weight and bias (same names)."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: Tensor) -> Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)  # one value per channel (dim 1)
        var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(shape)
        out = (x - mean) * scale
        return out if self.bias is None else out + self.bias.view(shape)
