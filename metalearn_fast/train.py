"""pretrain() and adapt(): train a model on a set of example tasks, then fine-tune it on a new one."""
from __future__ import annotations

import copy
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["pretrain", "adapt", "as_tensor"]

OptimizerArg = Union[None, torch.optim.Optimizer, Callable[..., torch.optim.Optimizer]]


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        return p.dtype, p.device
    raise ValueError("model has no parameters to train")


def as_tensor(name: str, data, dtype: torch.dtype, device: torch.device) -> Tensor:
    """data (numpy array, tensor or nested list) as a tensor of dtype on device, checked for emptiness and NaN."""
    if isinstance(data, Tensor):
        tensor = data
    elif isinstance(data, (np.ndarray, list, tuple)):
        array = np.asarray(data)
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(data).__name__}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {tensor.dtype}")
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {list(tensor.shape)})")
    tensor = tensor.to(device=device, dtype=dtype if dtype.is_floating_point else tensor.dtype)
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


def _fit(model, x, y, *, epochs, batch_size, optimizer, loss_fn, shuffle, progress, label) -> list[float]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if int(epochs) != epochs or epochs < 0:
        raise ValueError(f"epochs must be a non-negative integer, got {epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    dtype, device = _model_dtype_device(model)
    x = as_tensor("x", x, dtype, device)
    y = as_tensor("y", y, dtype, device)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    loss_fn = nn.MSELoss() if loss_fn is None else loss_fn
    n = x.shape[0]
    model.train()
    losses = []
    for epoch in range(int(epochs)):
        order = _epoch_order(n, shuffle)
        if order is not None:
            order = order.to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        batches = 0
        for start in range(0, n, int(batch_size)):
            if order is None:
                batch_x, batch_y = x[start : start + batch_size], y[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                batch_x, batch_y = x[index], y[index]
            optimizer.zero_grad()
            loss = loss_fn(model(batch_x), batch_y)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            batches += 1
        losses.append(float(total) / batches)
        if progress:
            print(f"{label} epoch {epoch + 1}/{epochs}: loss {losses[-1]:.6f}", flush=True)
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
) -> list[float]:
    """Train ``model`` in place on (x, y) and return the mean loss of each epoch.

    x: [N, ...] and y: [N, ...] as numpy arrays or tensors (moved to the model's device and dtype).
    Defaults: Adam(lr) and MSE. ``optimizer`` is an optimizer over the model's parameters or a
    callable ``params -> optimizer``. ``shuffle`` draws each epoch's order as DataLoader(shuffle=True).
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
