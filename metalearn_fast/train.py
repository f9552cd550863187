"""pretrain() and adapt(): train a model on a set of example tasks, then fine-tune it on a new one."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import tensor_of_numbers
from .plan import ModelPlan
from .ops import mlp_train_epoch_
from .optim import FusedUpdate

__all__ = ["pretrain", "adapt", "as_tensor", "training_path", "train_in_order", "EpochLosses"]

OptimizerArg = Union[None, torch.optim.Optimizer, Callable[..., torch.optim.Optimizer]]


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        return p.dtype, p.device
    raise ValueError("model has no parameters to train")


def as_tensor(name: str, data, dtype: torch.dtype, device: torch.device, keep_integers: bool = False) -> Tensor:
    """data (numpy array, tensor or nested list) as a tensor of dtype on device, checked for emptiness and NaN.

    With keep_integers, integer data (class labels) becomes int64 instead of dtype."""
    tensor = tensor_of_numbers(name, data)
    if tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {list(tensor.shape)})")
    integers = not tensor.is_floating_point()
    tensor = tensor.to(device=device, dtype=torch.int64 if keep_integers and integers else dtype)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _make_optimizer(model: nn.Module, optimizer: OptimizerArg, lr: float) -> torch.optim.Optimizer:
    if optimizer is None:
        return torch.optim.Adam(model.parameters(), lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            if any(id(p) not in own for p in group["params"]):
                raise ValueError("optimizer holds parameters that are not the model's")
        return optimizer
    if callable(optimizer):
        made = optimizer(model.parameters())
        if not isinstance(made, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory must return a torch.optim.Optimizer, got {type(made).__name__}")
        return made
    raise TypeError(
        f"optimizer must be None, a torch.optim.Optimizer or a callable taking parameters, got {type(optimizer).__name__}"
    )


def _epoch_order(n: int, shuffle: bool) -> Optional[Tensor]:
    """Each epoch's order, drawn from the global RNG exactly as a DataLoader would draw it.

    A DataLoader draws a base seed for its workers at every epoch, then RandomSampler draws the
    seed of its permutation; doing the same keeps every later random draw (dropout, init) equal to
    a plain-torch loop's."""
    torch.empty((), dtype=torch.int64).random_()
    if not shuffle:
        return None
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(n, generator=generator)


class EpochLosses(list):
    """The mean loss of each epoch (a list of floats); ``path`` says how the epochs ran: "fused" (one
    C++ call per epoch, ops.mlp_train_epoch_) or "python: <why the fused path was not taken>"."""

    path: str = ""


_LOSSES = {
    "mse": (nn.MSELoss, F.mse_loss),
    "cross_entropy": (nn.CrossEntropyLoss, F.cross_entropy),
}


def _builtin_loss(loss_fn) -> Optional[str]:
    """'mse' or 'cross_entropy' when loss_fn computes exactly that mean loss, else None."""
    if loss_fn is None:
        return "mse"
    for name, (module, function) in _LOSSES.items():
        if loss_fn is function:
            return name
        if type(loss_fn) is module and loss_fn.reduction == "mean":
            if module is nn.MSELoss or (loss_fn.weight is None and loss_fn.label_smoothing == 0):
                return name
    return None


def _has_hooks(model: nn.Module) -> bool:
    hooks = torch.nn.modules.module
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
            or hooks._global_backward_pre_hooks):
        return True
    for module in model.modules():
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return True
    return any(p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


class _FusedTraining:
    """An epoch of ``model`` in one call of ops.mlp_train_epoch_, the optimizer's step included."""

    def __init__(self, params: list[Tensor], loss: str, update: FusedUpdate) -> None:
        self.params, self.loss, self.update = params, loss, update

    @classmethod
    def plan(cls, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: Tensor,
             y: Tensor) -> Union["_FusedTraining", str]:
        """The fused epoch for these arguments, or why the Python loop must run them (a sentence)."""
        if not ModelPlan(model, builtin_loss=True).is_mlp:
            return ("the model is not an MLP (MLP, SimpleNet, or nn.Sequential of nn.Linear with nn.ReLU between "
                    "them)")
        loss = _builtin_loss(loss_fn)
        if loss is None:
            return f"loss_fn is {type(loss_fn).__name__}; the fused step computes nn.MSELoss and nn.CrossEntropyLoss"
        if _has_hooks(model):
            return "the model has hooks"
        params = list(model.parameters())  # [weight, bias] per layer: linear_stack checked the order
        if not all(p.requires_grad for p in params):
            return "some parameters are frozen (requires_grad=False)"
        if params[0].device.type not in ("cpu", "cuda") or torch.is_autocast_enabled():
            return "the model is not on a CPU or CUDA device, or autocast is on"
        if x.dim() != 2 or x.shape[1] != params[0].shape[1]:
            return f"x is {list(x.shape)}, not [N, {params[0].shape[1]}]"
        outputs = params[-2].shape[0]
        if loss == "mse" and (y.dtype != x.dtype or list(y.shape) != [x.shape[0], outputs]):
            return f"y is {list(y.shape)} {y.dtype}, not [{x.shape[0]}, {outputs}] of the model's dtype"
        if loss == "cross_entropy" and (y.dtype != torch.int64 or y.dim() != 1 or int(y.min()) < 0
                                        or int(y.max()) >= outputs):
            return f"y is not [N] int64 class labels in [0, {outputs})"
        update = FusedUpdate.plan(optimizer, params)
        if isinstance(update, str):
            return update
        return cls(params, loss, update)

    def epoch(self, x: Tensor, y: Tensor, order: Optional[Tensor], batch_size: int) -> Tensor:
        """The loss of every batch of one epoch: [ceil(N / batch_size)]."""
        grads, state, settings = self.update.arguments()
        with torch.no_grad():
            losses = mlp_train_epoch_(self.params, grads, state, x, y, order, batch_size, self.loss,
                                      self.update.kind, settings)
        self.update.finish(state)
        return losses


def _python_epoch(model, optimizer, loss_fn, x, y, order: Optional[Tensor], batch_size: int) -> Tensor:
    """The loss of every batch of one epoch of the plain loop: zero_grad, forward, backward, step."""
    losses = []
    for start in range(0, x.shape[0], batch_size):
        if order is None:
            batch_x, batch_y = x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            batch_x, batch_y = x[index], y[index]
        optimizer.zero_grad()
        loss = loss_fn(model(batch_x), batch_y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def train_in_order(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x: Tensor, y: Tensor,
                   batch_size: int) -> Tensor:
    """One pass over x, y (tensors of the model's dtype and device) in order, batch_size rows a step: each step's
    loss [ceil(N / batch_size)], detached. pretrain's fused epoch where it takes the arguments (training_path), else
    the plain loop (zero_grad, forward, backward, step); no random number is drawn."""
    fused = _FusedTraining.plan(model, optimizer, loss_fn, x, y)
    if isinstance(fused, _FusedTraining):
        return fused.epoch(x, y, None, batch_size)
    return _python_epoch(model, optimizer, loss_fn, x, y, None, batch_size)


def training_path(model: nn.Module, x, y, *, optimizer: OptimizerArg = None, loss_fn=None, lr: float = 1e-3) -> str:
    """How pretrain/adapt would run these arguments: "fused", or "python: <why not fused>"."""
    optimizer = _make_optimizer(model, optimizer, lr)
    dtype, device = _model_dtype_device(model)
    plan = _FusedTraining.plan(model, optimizer, loss_fn, as_tensor("x", x, dtype, device),
                               as_tensor("y", y, dtype, device, keep_integers=True))
    return "fused" if isinstance(plan, _FusedTraining) else f"python: {plan}"


def _progress_bar(epochs: int, label: str):
    """A tqdm bar over the epochs, or None without tqdm (then each epoch prints a line)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=epochs, desc=label, unit="epoch")


def _fit(model, x, y, *, epochs, batch_size, optimizer, loss_fn, shuffle, progress, label) -> EpochLosses:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    epochs, batch_size = int(epochs), int(batch_size)
    dtype, device = _model_dtype_device(model)
    x = as_tensor("x", x, dtype, device)
    y = as_tensor("y", y, dtype, device, keep_integers=True)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    loss_fn = nn.MSELoss() if loss_fn is None else loss_fn
    n = x.shape[0]
    model.train()
    fused = _FusedTraining.plan(model, optimizer, loss_fn, x, y)
    losses = EpochLosses()
    losses.path = "fused" if isinstance(fused, _FusedTraining) else f"python: {fused}"
    bar = _progress_bar(epochs, label) if progress else None
    warned = False
    for epoch in range(epochs):
        order = _epoch_order(n, shuffle)
        if order is not None:
            order = order.to(device)
        if isinstance(fused, _FusedTraining):
            batch_losses = fused.epoch(x, y, order, batch_size)
        else:
            batch_losses = _python_epoch(model, optimizer, loss_fn, x, y, order, batch_size)
        losses.append(float(batch_losses.double().sum()) / batch_losses.numel())
        if not warned and not math.isfinite(losses[-1]):
            bad = int((~torch.isfinite(batch_losses)).nonzero()[0])
            warnings.warn(f"{label}: the loss is {float(batch_losses[bad])} at epoch {epoch + 1}, batch {bad + 1}; "
                          "training goes on with non-finite values", RuntimeWarning, stacklevel=3)
            warned = True
        if bar is not None:
            bar.update()
            bar.set_postfix_str(f"loss {losses[-1]:.6f}")
        elif progress:
            print(f"{label} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.6f}", flush=True)
    if bar is not None:
        bar.close()
    return losses


def pretrain(
    model: nn.Module,
    x,
    y,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: OptimizerArg = None,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    lr: float = 1e-3,
    shuffle: bool = False,
    progress: bool = False,
) -> EpochLosses:
    """Train ``model`` in place on (x, y) and return the mean loss of each epoch.

    x: [N, ...] and y: [N, ...] as numpy arrays or tensors (moved to the model's device and dtype).
    Defaults: Adam(lr) and MSE. ``optimizer`` is an optimizer over the model's parameters or a
    callable ``params -> optimizer``. ``shuffle`` draws each epoch's order as DataLoader(shuffle=True).
    ``progress`` shows a bar over the epochs with the running loss. A loss that turns NaN or infinite
    warns once, naming the epoch and batch.

    An MLP (``MLP``, ``SimpleNet``, ``nn.Sequential`` of Linear and ReLU) trained with MSE or cross-entropy
    and torch.optim's Adam, AdamW or SGD runs each epoch as one C++ call, the optimizer's update on its own
    state included, with the numbers of the plain loop; anything else runs the plain loop
    (zero_grad, forward, backward, step). The returned list's ``path`` says which ran, and why.
    """
    optimizer = _make_optimizer(model, optimizer, lr)
    return _fit(model, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, loss_fn=loss_fn,
                shuffle=shuffle, progress=progress, label="pretrain")


def adapt(
    model: nn.Module,
    x,
    y,
    *,
    epochs: int = 10,
    batch_size: int = 32,
    optimizer: OptimizerArg = None,
    loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    lr: float = 1e-3,
    shuffle: bool = False,
    progress: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Fine-tune on a new task's (x, y) and return the adapted model.

    Trains a deep copy unless ``inplace=True``; the original's parameters stay bit-identical. An
    optimizer instance given with ``inplace=False`` is copied along with the model, its state included.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        if isinstance(optimizer, torch.optim.Optimizer):
            _make_optimizer(model, optimizer, lr)  # check it belongs to the model before copying both
            model, optimizer = copy.deepcopy((model, optimizer))
        else:
            model = copy.deepcopy(model)
    optimizer = _make_optimizer(model, optimizer, lr)
    _fit(model, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, loss_fn=loss_fn,
         shuffle=shuffle, progress=progress, label="adapt")
    return model
