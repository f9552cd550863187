"""The ops in plain torch, with the compiled ops' signatures: the fallback and the test oracle.

Shapes carry an optional leading task dimension T: ``x [T, N, I]``, ``weight [T, O, I]``,
``bias [T, O]``; without it ``[N, I]``, ``[O, I]``, ``[O]``. Every function raises the same
errors as the compiled kernels (ValueError for shapes and devices, TypeError for dtypes).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "linear_relu",
    "linear_relu_backward",
    "linear_relu_backward_backward",
    "sgd_step",
    "sgd_step_",
    "maml_mlp_loss",
    "maml_mlp_meta_grad",
    "maml_mlp_meta_step_",
    "maml_mlp_meta_steps_",
    "mlp_forward",
    "mlp_train_epoch_",
    "optimizer_step_",
    "reptile_mlp_step_",
    "task_losses",
]


def _check_x_weight(op: str, x: Tensor, weight: Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{op}: weight must be on x's device {x.device}, got {weight.device}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{op}: x must be [N, I] or [T, N, I], got shape {list(x.shape)}")
    if weight.dim() != x.dim():
        want = "[O, I]" if x.dim() == 2 else "[T, O, I]"
        raise ValueError(f"{op}: weight must be {want} to match x of shape {list(x.shape)}, got shape {list(weight.shape)}")
    if x.dim() == 3 and weight.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: weight has T = {weight.shape[0]} tasks but x has T = {x.shape[0]}")
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must have I = x.size(-1) = {x.shape[-1]} input features, got shape {list(weight.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{op}: x is empty (shape {list(x.shape)})")
    if weight.numel() == 0:
        raise ValueError(f"{op}: weight is empty (shape {list(weight.shape)})")


def _check_like_out(op: str, name: str, t: Tensor, x: Tensor, weight: Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device {x.device}, got {t.device}")
    expected = list(x.shape[:-1]) + [weight.shape[-2]]
    if list(t.shape) != expected:
        raise ValueError(f"{op}: {name} must have shape {expected}, got {list(t.shape)}")


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """relu(x @ weight^T + bias): x [T, N, I] | [N, I] -> [T, N, O] | [N, O]."""
    op = "linear_relu"
    _check_x_weight(op, x, weight)
    if bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias must have x's dtype {x.dtype}, got {bias.dtype}")
    if bias.device != x.device:
        raise ValueError(f"{op}: bias must be on x's device {x.device}, got {bias.device}")
    if bias.shape != weight.shape[:-1]:
        raise ValueError(
            f"{op}: bias must have shape {list(weight.shape[:-1])} to match weight of shape "
            f"{list(weight.shape)}, got {list(bias.shape)}"
        )
    if x.dim() == 2:
        return torch.relu(torch.addmm(bias, x, weight.t()))
    return torch.relu(torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)))


def linear_relu_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, out: Tensor, output_mask: Sequence[bool]
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_x, grad_weight, grad_bias) of linear_relu, None where output_mask is False.

    gz = grad_out * (out > 0); grad_x = gz @ weight; grad_weight = gz^T @ x; grad_bias = sum_N gz.
    """
    op = "linear_relu_backward"
    _check_x_weight(op, x, weight)
    _check_like_out(op, "grad_out", grad_out, x, weight)
    _check_like_out(op, "out", out, x, weight)
    gz = grad_out * (out > 0)
    grad_x = gz @ weight if output_mask[0] else None
    grad_weight = gz.transpose(-1, -2) @ x if output_mask[1] else None
    grad_bias = gz.sum(-2) if output_mask[2] else None
    return grad_x, grad_weight, grad_bias


def linear_relu_backward_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    out: Tensor,
    ggx: Optional[Tensor],
    ggw: Optional[Tensor],
    ggb: Optional[Tensor],
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of linear_relu_backward w.r.t. (grad_out, x, weight) given those of its outputs.

    With m = out > 0 (piecewise constant, so out gets no gradient):
    d grad_out = m * (ggx @ weight^T + x @ ggw^T + ggb), d weight = gz^T @ ggx, d x = gz @ ggw.
    """
    mask = out > 0
    gz = grad_out * mask
    total = None
    if ggx is not None:
        total = ggx @ weight.transpose(-1, -2)
    if ggw is not None:
        term = x @ ggw.transpose(-1, -2)
        total = term if total is None else total + term
    if ggb is not None:
        term = ggb.unsqueeze(-2)
        total = term.expand_as(grad_out) if total is None else total + term
    d_grad_out = None if total is None else total * mask
    d_x = None if ggw is None else gz @ ggw
    d_weight = None if ggx is None else gz.transpose(-1, -2) @ ggx
    return d_grad_out, d_x, d_weight


def _lr_for(lr: Sequence[Tensor], i: int) -> Tensor:
    """The rate of params[i]: lr holds one tensor for all params, or one per param."""
    return lr[0] if len(lr) == 1 else lr[i]


def _check_sgd_step_args(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Sequence[Tensor]) -> None:
    if len(params) == 0:
        raise ValueError("sgd_step: params is empty")
    if len(grads) != len(params):
        raise ValueError(f"sgd_step: grads must hold one tensor per param ({len(params)}), got {len(grads)}")
    if len(lr) not in (1, len(params)):
        raise ValueError(f"sgd_step: lr must hold one tensor or one per param ({len(params)}), got {len(lr)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        rate = _lr_for(lr, i)
        if not p.is_floating_point():
            raise TypeError(f"sgd_step: params[{i}] must be floating-point, got {p.dtype}")
        if p.dtype != params[0].dtype:
            raise TypeError(
                f"sgd_step: params must share one dtype, params[0] is {params[0].dtype} and params[{i}] is {p.dtype}"
            )
        if p.device != params[0].device:
            raise ValueError(
                f"sgd_step: params must share one device, params[0] is on {params[0].device} "
                f"and params[{i}] on {p.device}"
            )
        if g.dtype != p.dtype:
            raise TypeError(f"sgd_step: grads[{i}] must have dtype {p.dtype} like params[{i}], got {g.dtype}")
        if rate.dtype != p.dtype:
            raise TypeError(f"sgd_step: lr must have dtype {p.dtype} like params[{i}], got {rate.dtype}")
        if g.device != p.device or rate.device != p.device:
            raise ValueError(f"sgd_step: grads[{i}] and lr must be on the device of params[{i}] ({p.device})")
        if g.shape != p.shape:
            raise ValueError(f"sgd_step: grads[{i}] must have shape {list(p.shape)} like params[{i}], got {list(g.shape)}")
        _check_lr_layout(p, rate, i)


def _check_lr_layout(param: Tensor, lr: Tensor, i: int) -> None:
    """lr must be a scalar, one rate per task [T, 1, ...], or one per element ([*S] or [T, *S])."""
    if lr.dim() > param.dim():
        raise ValueError(
            f"sgd_step: lr[{i}] of shape {list(lr.shape)} does not broadcast to params[{i}] of shape {list(param.shape)}"
        )
    offset = param.dim() - lr.dim()
    spread = [d + offset for d in range(lr.dim()) if lr.shape[d] != 1]
    if spread and any(lr.shape[d - offset] != param.shape[d] for d in range(spread[0], spread[-1] + 1)):
        raise ValueError(
            f"sgd_step: lr[{i}] of shape {list(lr.shape)} must be a scalar, one rate per task [T, 1, ...], "
            f"or one per element of params[{i}] of shape {list(param.shape)}"
        )


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Sequence[Tensor]) -> list[Tensor]:
    """[p - lr_i * g for each param]; lr holds one tensor for all params or one per param."""
    _check_sgd_step_args(params, grads, lr)
    return [p - _lr_for(lr, i) * g for i, (p, g) in enumerate(zip(params, grads))]


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Sequence[Tensor]) -> None:
    """In place: p -= lr_i * g for each param, refused where autograd would have to see the update."""
    _check_sgd_step_args(params, grads, lr)
    if torch.is_grad_enabled():
        for i, p in enumerate(params):
            if p.requires_grad:
                raise ValueError(
                    f"sgd_step_: params[{i}] requires grad; update it in place under torch.no_grad(), or use sgd_step"
                )
        if any(t.requires_grad for t in grads):
            raise ValueError("sgd_step_: grads must not require grad")
        if any(t.requires_grad for t in lr):
            raise ValueError("sgd_step_: lr must not require grad")
    for i, (p, g) in enumerate(zip(params, grads)):
        p.sub_(_lr_for(lr, i) * g)


def mlp_forward(x: Tensor, params: Sequence[Tensor]) -> Tensor:
    """An MLP [W0, b0, W1, b1, ...] with ReLU between layers: x [T, K, I] -> [T, K, out].

    Each weight is shared ([O, I]) or one per task ([T, O, I]); biases likewise ([O] or [T, O])."""
    h = x
    count = len(params) // 2
    for layer in range(count):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        if weight.dim() == 2:  # nn.Linear's own op: the fallback's training rounds as the plain loop does
            h = torch.nn.functional.linear(h, weight, bias)
        else:
            h = h @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
        if layer + 1 < count:
            h = torch.relu(h)
    return h


def task_losses(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    """Each task's mean loss: pred [T, K, D], target [T, K, D] (mse) or [T, K] labels -> [T]."""
    if loss == "mse":
        return (pred - target).square().mean(dim=(1, 2))
    if loss == "cross_entropy":
        tasks, rows, width = pred.shape
        flat = torch.nn.functional.cross_entropy(pred.reshape(tasks * rows, width), target.reshape(-1), reduction="none")
        return flat.view(tasks, rows).mean(1)
    raise ValueError(f"maml_mlp_meta_grad: loss must be 'mse' or 'cross_entropy', got {loss!r}")


def _check_maml_args(params, lr, x_support, y_support, x_query, y_query, inner_steps, loss, first_adapted_layer,
                     per_step_lr=False, step_weights=()):
    op = "maml_mlp_meta_grad"
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"{op}: loss must be 'mse' or 'cross_entropy', got {loss!r}")
    if len(params) < 2 or len(params) % 2:
        raise ValueError(f"{op}: params must be [weight_0, bias_0, weight_1, bias_1, ...], got {len(params)} tensors")
    count = len(params) // 2
    if inner_steps < 1:
        raise ValueError(f"{op}: inner_steps must be >= 1, got {inner_steps}")
    if not 0 <= first_adapted_layer < count:
        raise ValueError(f"{op}: first_adapted_layer must be in [0, {count}), got {first_adapted_layer}")
    if len(lr) not in (1, len(params)):
        raise ValueError(f"{op}: lr must hold one tensor or one per param, got {len(lr)}")
    dtype, width_in = params[0].dtype, params[0].shape[-1]
    for name, x in (("x_support", x_support), ("x_query", x_query)):
        if x.dtype != dtype:
            raise TypeError(f"{op}: {name} must have the params' dtype {dtype}, got {x.dtype}")
        if x.dim() != 3 or x.shape[0] != x_support.shape[0] or x.shape[1] == 0 or x.shape[2] != width_in:
            raise ValueError(
                f"{op}: {name} must be [T, K, {width_in}] with T = {x_support.shape[0]} and K >= 1, got {list(x.shape)}"
            )
        if x.device != params[0].device:
            raise ValueError(f"{op}: {name} must be on the params' device")
    if x_support.shape[0] == 0:
        raise ValueError(f"{op}: the meta-batch is empty (T = 0)")
    for layer in range(count):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{op}: params[{2 * layer}] and params[{2 * layer + 1}] must be a weight [O, I] and a bias [O], "
                f"got {list(weight.shape)} and {list(bias.shape)}"
            )
        if layer and weight.shape[1] != params[2 * layer - 2].shape[0]:
            raise ValueError(
                f"{op}: params[{2 * layer}] must take {params[2 * layer - 2].shape[0]} inputs, got shape {list(weight.shape)}"
            )
        if weight.dtype != dtype or bias.dtype != dtype:
            raise TypeError(f"{op}: params must share one dtype")
    if step_weights and len(step_weights) != inner_steps:
        raise ValueError(f"{op}: step_weights must hold one weight per inner step ({inner_steps}) or none, got "
                         f"{len(step_weights)}")
    if not all(math.isfinite(w) for w in step_weights):
        raise ValueError(f"{op}: step_weights must be finite, got {list(step_weights)}")
    for i, rate in enumerate(lr):
        if per_step_lr and (rate.dim() != 1 or rate.shape[0] != inner_steps):
            raise ValueError(f"{op}: lr[{i}] must hold one rate per inner step, [{inner_steps}], with per_step_lr, "
                             f"got {list(rate.shape)}")
        if not per_step_lr and rate.dim() != 0 and rate.shape != params[i].shape:
            raise ValueError(
                f"{op}: lr[{i}] must be a scalar or have the shape of params[{i}], got {list(rate.shape)}"
            )
    width = params[-2].shape[0]
    for name, y, x in (("y_support", y_support, x_support), ("y_query", y_query, x_query)):
        if loss == "mse":
            if y.dim() != 3 or y.shape[:2] != x.shape[:2] or y.shape[2] != width:
                raise ValueError(f"{op}: {name} must be [T, K, {width}] for the mse loss, got {list(y.shape)}")
            if y.dtype != dtype:
                raise TypeError(f"{op}: {name} must have the params' dtype")
        else:
            if y.dim() != 2 or y.shape != x.shape[:2]:
                raise ValueError(f"{op}: {name} must be [T, K] class labels for cross_entropy, got {list(y.shape)}")
            if y.dtype != torch.int64:
                raise TypeError(f"{op}: {name} must be int64 labels, got {y.dtype}")
            _check_labels_in_range(op, name, y, width)


def _check_labels_in_range(op: str, name: str, y: Tensor, classes: int) -> None:
    """As csrc/checks.h: on the CPU an error naming the labels found; elsewhere a device-side assert, so that a
    training step never waits for the device (no host sync)."""
    if y.numel() == 0:
        return
    if y.device.type != "cpu":
        torch._assert_async(((y >= 0) & (y < classes)).all(), f"{op}: {name} must hold class labels in [0, {classes})")
        return
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise ValueError(f"{op}: {name} must hold class labels in [0, {classes}), got labels from {low} to {high}")


def maml_mlp_loss(
    params: Sequence[Tensor],
    lr: Sequence[Tensor],
    x_support: Tensor,
    y_support: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    inner_steps: int,
    first_order: bool,
    loss: str,
    first_adapted_layer: int,
    per_step_lr: bool = False,
    step_weights: Sequence[float] = (),
) -> Tensor:
    """The MAML meta-loss of an MLP over a meta-batch in batched torch, differentiable by autograd.

    params [W0, b0, W1, b1, ...] (ReLU between layers); lr one tensor (scalar, or shaped like every
    param) or one per param; x_* [T, K, I]; y_* [T, K, D] (mse) or [T, K] labels (cross_entropy).
    Layers from first_adapted_layer on adapt in the inner loop (ANIL adapts the last only). The loss
    is the mean over tasks of each task's query loss after inner_steps SGD steps on its support loss;
    its gradient w.r.t. params and lr is MAML's (FOMAML's when first_order: the inner gradients are
    constants). MAML++: with per_step_lr every lr tensor is [inner_steps], step s taking element s; with
    step_weights the loss is sum_s step_weights[s] * (that mean after inner step s + 1)."""
    _check_maml_args(params, lr, x_support, y_support, x_query, y_query, inner_steps, loss, first_adapted_layer,
                     per_step_lr, step_weights)
    weights = list(step_weights) or [0.0] * (inner_steps - 1) + [1.0]
    for name, data in (("x_support", x_support), ("y_support", y_support), ("x_query", x_query), ("y_query", y_query)):
        if torch.is_grad_enabled() and data.requires_grad:
            raise ValueError(
                f"maml_mlp_loss: {name} requires grad, but the op differentiates w.r.t. params and lr only; detach it"
            )
    tasks = x_support.shape[0]
    outer = torch.is_grad_enabled() and any(t.requires_grad for t in (*params, *lr))
    first = 2 * first_adapted_layer
    with torch.enable_grad():
        # the inner loop differentiates w.r.t. the adapted params: those the caller does not
        # differentiate become leaves of their own; per-task copies so that each task gets its own gradient
        start = [p if outer and p.requires_grad else p.detach().requires_grad_() for p in params[first:]]
        fast = list(params[:first]) + [p.expand(tasks, *p.shape) for p in start]
        total = None
        for step in range(inner_steps):
            support = task_losses(mlp_forward(x_support, fast), y_support, loss).sum()
            grads = torch.autograd.grad(support, fast[first:], create_graph=outer and not first_order)
            rates = [_lr_for(lr, first + i) for i in range(len(grads))]
            fast = fast[:first] + [p - (r[step] if per_step_lr else r) * g
                                   for p, g, r in zip(fast[first:], grads, rates)]
            if weights[step] != 0 or step == inner_steps - 1:
                with torch.set_grad_enabled(outer):
                    term = weights[step] * task_losses(mlp_forward(x_query, fast), y_query, loss).mean()
                total = term if total is None else total + term
    return total if outer else total.detach()


def mlp_loss_grad(params: Sequence[Tensor], x: Tensor, y: Tensor, loss: str) -> list[Tensor]:
    """The gradient of the mean loss of an MLP on one task (x [N, I]; y [N, D] for mse, [N] labels for
    cross_entropy) w.r.t. params [W0, b0, W1, b1, ...], by autograd: differentiable again when params
    require grad (create_graph)."""
    if len(params) == 0:
        raise ValueError("mlp_loss_grad: params is empty")
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"mlp_loss_grad: x must be [N, I] with N >= 1, got {list(x.shape)}")
    if loss == "mse" and (y.dim() != 2 or y.shape[0] != x.shape[0]):
        raise ValueError(f"mlp_loss_grad: y must be [{x.shape[0]}, outputs] for the mse loss, got {list(y.shape)}")
    if loss == "cross_entropy" and (y.dim() != 1 or y.shape[0] != x.shape[0]):
        raise ValueError(f"mlp_loss_grad: y must be [{x.shape[0]}] class labels for cross_entropy, got {list(y.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        raise ValueError("mlp_loss_grad: x and y must not require grad (the op differentiates w.r.t. params only); "
                         "detach them")
    _check_maml_args(params, [torch.zeros((), dtype=params[0].dtype)], x[None], y[None], x[None], y[None], 1, loss, 0)
    outer = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    with torch.enable_grad():
        leaves = [p if outer and p.requires_grad else p.detach().requires_grad_() for p in params]
        value = task_losses(mlp_forward(x[None], leaves), y[None], loss).sum()
        grads = torch.autograd.grad(value, leaves, create_graph=outer)
    return list(grads) if outer else [g.detach() for g in grads]


def mlp_loss_hessian_times(params: Sequence[Tensor], x: Tensor, y: Tensor, loss: str,
                           direction: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """The Hessian of mlp_loss_grad's loss applied to direction (one tensor per param, None for zero), by
    autograd: the gradient of <grad, direction>."""
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_() for p in params]
        grads = mlp_loss_grad(leaves, x, y, loss)
        wanted = [(g, d) for g, d in zip(grads, direction) if d is not None]
        if not wanted:
            return [torch.zeros_like(p) for p in params]
        found = torch.autograd.grad([g for g, _ in wanted], leaves, [d for _, d in wanted], allow_unused=True)
    return [torch.zeros_like(p) if f is None else f for f, p in zip(found, params)]


def maml_mlp_meta_grad(
    params: Sequence[Tensor],
    lr: Sequence[Tensor],
    x_support: Tensor,
    y_support: Tensor,
    x_query: Tensor,
    y_query: Tensor,
    inner_steps: int,
    first_order: bool,
    loss: str,
    first_adapted_layer: int,
    compute_grad: bool,
    compute_lr_grad: bool,
    per_step_lr: bool = False,
    step_weights: Sequence[float] = (),
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """maml_mlp_loss and, by autograd, its gradient w.r.t. params (when compute_grad) and lr (when
    compute_lr_grad): (loss, param grads, lr grads), each list empty unless asked for."""
    meta = [p.detach().requires_grad_(compute_grad) for p in params]
    rates = [r.detach().requires_grad_(compute_lr_grad) for r in lr]
    wanted = (meta if compute_grad else []) + (rates if compute_lr_grad else [])
    with torch.enable_grad():
        query = maml_mlp_loss(meta, rates, x_support, y_support, x_query, y_query, inner_steps, first_order, loss,
                              first_adapted_layer, per_step_lr, step_weights)
        found = torch.autograd.grad(query, wanted, allow_unused=True) if wanted else []
    found = [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(found, wanted)]
    count = len(meta) if compute_grad else 0
    return query.detach(), found[:count], found[count:]


# ---- optimizer updates and the fused training steps ----

SETTINGS_PER_PARAM = 7  # see optimizer_step_


def _optimizer_layout(op: str, optimizer: str, settings: Sequence[float], params: Sequence[Tensor],
                      grads: Sequence[Tensor], state: Sequence[Tensor]) -> list[tuple[list[float], list[Tensor]]]:
    """(settings, state tensors) of each updated tensor, checked as the compiled ops check them."""
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"{op}: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if len(grads) != len(params):
        raise ValueError(f"{op}: grads must hold one tensor per updated tensor ({len(params)}), got {len(grads)}")
    if len(settings) != len(params) * SETTINGS_PER_PARAM:
        raise ValueError(f"{op}: settings must hold {SETTINGS_PER_PARAM} numbers per updated tensor "
                         f"({len(params) * SETTINGS_PER_PARAM}), got {len(settings)}")
    layout, next_state = [], 0
    for i, (param, grad) in enumerate(zip(params, grads)):
        values = list(settings[i * SETTINGS_PER_PARAM : (i + 1) * SETTINGS_PER_PARAM])
        count = 3 if optimizer == "adam" else int(values[1] != 0)
        layout.append((values, list(state[next_state : next_state + count])))
        next_state += count
        if not param.is_floating_point():
            raise TypeError(f"{op}: updated tensor {i} must be floating point, got {param.dtype}")
        if grad.dtype != param.dtype:
            raise TypeError(f"{op}: grads[{i}] must have dtype {param.dtype}, got {grad.dtype}")
        if grad.shape != param.shape or grad.device != param.device:
            raise ValueError(f"{op}: grads[{i}] must match its tensor's shape {list(param.shape)} and device "
                             f"{param.device}, got {list(grad.shape)} on {grad.device}")
    if len(state) != next_state:
        raise ValueError(f"{op}: state must hold {next_state} tensors for these settings, got {len(state)}")
    return layout


def optimizer_step_(params: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Tensor], optimizer: str,
                    settings: Sequence[float]) -> None:
    """torch.optim's Adam/AdamW ("adam") or SGD ("sgd") step on params, in place, from grads, updating the
    optimizer's state tensors in place, with torch's single-tensor formulas.

    settings: 7 numbers per param, from its param group: adam: lr, beta1, beta2, eps, weight_decay,
    decoupled_weight_decay (AdamW), maximize; sgd: lr, momentum, dampening, weight_decay, nesterov, maximize,
    has_buffer (0: the momentum buffer is new, and this step copies the gradient into it). state, per param:
    adam: step (0-dim, on the CPU), exp_avg, exp_avg_sq; sgd: momentum_buffer when momentum != 0."""
    layout = _optimizer_layout("optimizer_step_", optimizer, settings, params, grads, state)
    with torch.no_grad():
        for param, grad, (values, tensors) in zip(params, grads, layout):
            if optimizer == "adam":
                _adam_update(param, grad, tensors, *values)
            else:
                _sgd_update(param, grad, tensors, *values)


def _adam_update(param, grad, state, lr, beta1, beta2, eps, weight_decay, decoupled, maximize):
    step_t, exp_avg, exp_avg_sq = state
    grad = -grad if maximize else grad
    step_t += 1
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = step_t.item()
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _sgd_update(param, grad, state, lr, momentum, dampening, weight_decay, nesterov, maximize, has_buffer):
    grad = -grad if maximize else grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    if momentum != 0:
        (buffer,) = state
        if has_buffer:
            buffer.mul_(momentum).add_(grad, alpha=1 - dampening)
        else:
            buffer.copy_(grad)
        grad = grad.add(buffer, alpha=momentum) if nesterov else buffer
    param.add_(grad, alpha=-lr)


def _settings_after_first_step(optimizer: str, settings: Sequence[float]) -> list[float]:
    """SGD's settings once every momentum buffer holds a history."""
    after = list(settings)
    if optimizer == "sgd":
        after[6::SETTINGS_PER_PARAM] = [1.0] * (len(after) // SETTINGS_PER_PARAM)
    return after


def _check_train_args(params, grads, x, y, order, batch_size, loss) -> None:
    op = "mlp_train_epoch_"
    if loss not in ("mse", "cross_entropy"):
        raise ValueError(f"{op}: loss must be 'mse' or 'cross_entropy', got {loss!r}")
    if len(params) < 2 or len(params) % 2:
        raise ValueError(f"{op}: params must be [weight_0, bias_0, weight_1, bias_1, ...], got {len(params)} tensors")
    if len(grads) != len(params):
        raise ValueError(f"{op}: grads must hold one tensor per param")
    dtype, device = params[0].dtype, params[0].device
    for layer in range(len(params) // 2):
        weight, bias = params[2 * layer], params[2 * layer + 1]
        if weight.dim() != 2 or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: params[{2 * layer}] and params[{2 * layer + 1}] must be a weight [O, I] and a "
                             f"bias [O], got {list(weight.shape)} and {list(bias.shape)}")
        if layer and weight.shape[1] != params[2 * layer - 2].shape[0]:
            raise ValueError(f"{op}: params[{2 * layer}] must take {params[2 * layer - 2].shape[0]} inputs, got "
                             f"shape {list(weight.shape)}")
        if weight.dtype != dtype or bias.dtype != dtype:
            raise TypeError(f"{op}: params must share one dtype")
        if weight.device != device or bias.device != device:
            raise ValueError(f"{op}: params must share one device")
    outputs = params[-2].shape[0]
    if x.dtype != dtype:
        raise TypeError(f"{op}: x must have the params' dtype {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{op}: x must be on the params' device {device}, got {x.device}")
    if x.dim() != 2 or x.shape[1] != params[0].shape[1]:
        raise ValueError(f"{op}: x must be [N, {params[0].shape[1]}], got {list(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError(f"{op}: x holds no examples")
    if batch_size < 1:
        raise ValueError(f"{op}: batch_size must be >= 1, got {batch_size}")
    if y.device != x.device:
        raise ValueError(f"{op}: y must be on x's device")
    if loss == "mse":
        if y.dtype != dtype:
            raise TypeError(f"{op}: y must have the params' dtype for mse")
        if list(y.shape) != [n, outputs]:
            raise ValueError(f"{op}: y must be [{n}, {outputs}] for mse, got {list(y.shape)}")
    else:
        if y.dtype != torch.int64:
            raise TypeError(f"{op}: y must be int64 class labels, got {y.dtype}")
        if list(y.shape) != [n]:
            raise ValueError(f"{op}: y must be [{n}] class labels, got {list(y.shape)}")
        _check_labels_in_range(op, "y", y, outputs)
    if order is not None:
        if order.dtype != torch.int64 or order.shape != (n,) or order.device != x.device:
            raise ValueError(f"{op}: order must be an int64 [{n}] index tensor on x's device, got {order.dtype} "
                             f"{list(order.shape)}")
        if int(order.min()) < 0 or int(order.max()) >= n:
            raise ValueError(f"{op}: order must index the {n} examples")


def mlp_train_epoch_(params: Sequence[Tensor], grads: Sequence[Tensor], state: Sequence[Tensor], x: Tensor, y: Tensor,
                     order: Optional[Tensor], batch_size: int, loss: str, optimizer: str,
                     settings: Sequence[float]) -> Tensor:
    """One epoch of minibatch training of an MLP [W0, b0, W1, b1, ...] (ReLU between layers), in place.

    Batches of batch_size rows of x [N, I] (in ``order``'s order, else sequential; the last may be partial);
    per batch the mean loss ("mse": y [N, O]; "cross_entropy": y [N] int64 labels), its gradient written into
    grads, and optimizer_step_ on params and state. Returns each batch's loss [ceil(N / batch_size)]."""
    _check_train_args(params, grads, x, y, order, batch_size, loss)
    _optimizer_layout("mlp_train_epoch_", optimizer, settings, params, grads, state)
    losses = []
    for start in range(0, x.shape[0], batch_size):
        if order is None:
            x_batch, y_batch = x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            x_batch, y_batch = x[index], y[index]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in params]
            pred = mlp_forward(x_batch, leaves)
            if loss == "mse":
                value = torch.nn.functional.mse_loss(pred, y_batch)
            else:
                value = torch.nn.functional.cross_entropy(pred, y_batch)
            found = torch.autograd.grad(value, leaves)
        with torch.no_grad():
            for grad, g in zip(grads, found):
                grad.copy_(g)
        optimizer_step_(params, grads, state, optimizer, settings)
        settings = _settings_after_first_step(optimizer, settings)
        losses.append(value.detach())
    return torch.stack(losses)


def maml_mlp_meta_step_(params: Sequence[Tensor], lr: Sequence[Tensor], grads: Sequence[Tensor],
                        state: Sequence[Tensor], x_support: Tensor, y_support: Tensor, x_query: Tensor,
                        y_query: Tensor, inner_steps: int, first_order: bool, loss: str, first_adapted_layer: int,
                        learn_lr: bool, optimizer: str, settings: Sequence[float], per_step_lr: bool = False,
                        step_weights: Sequence[float] = ()) -> Tensor:
    """A MAML meta-step of an MLP in place: maml_mlp_meta_grad's gradients written into grads (params', then
    lr's when learn_lr), then optimizer_step_ on params (and lr) and state. Returns the meta-loss."""
    if learn_lr and len(lr) != len(params):
        raise ValueError(f"maml_mlp_meta_step_: learned rates need one lr tensor per param, got {len(lr)}")
    updated = list(params) + (list(lr) if learn_lr else [])
    _optimizer_layout("maml_mlp_meta_step_", optimizer, settings, updated, grads, state)
    value, param_grads, lr_grads = maml_mlp_meta_grad(params, lr, x_support, y_support, x_query, y_query,
                                                      inner_steps, first_order, loss, first_adapted_layer, True,
                                                      learn_lr, per_step_lr, step_weights)
    with torch.no_grad():
        for grad, g in zip(grads, param_grads + lr_grads):
            grad.copy_(g)
    optimizer_step_(updated, grads, state, optimizer, settings)
    return value


def maml_mlp_meta_steps_(params: Sequence[Tensor], lr: Sequence[Tensor], grads: Sequence[Tensor],
                         state: Sequence[Tensor], x_support: Tensor, y_support: Tensor, x_query: Tensor,
                         y_query: Tensor, inner_steps: int, first_order: bool, loss: str, first_adapted_layer: int,
                         learn_lr: bool, optimizer: str, settings: Sequence[float], per_step_lr: bool = False,
                         step_weights: Sequence[float] = ()) -> Tensor:
    """maml_mlp_meta_step_ on each of S meta-batches stacked on a first dimension (x_support [S, T, K, I], ...), in
    turn, with the optimizer's settings of the call. Returns the S meta-losses."""
    op = "maml_mlp_meta_steps_"
    if x_support.dim() < 1 or x_support.shape[0] < 1:
        raise ValueError(f"{op}: x_support must be [S, T, K, ...], S >= 1 meta-batches stacked, got shape "
                         f"{list(x_support.shape)}")
    steps = x_support.shape[0]
    for name, t in (("y_support", y_support), ("x_query", x_query), ("y_query", y_query)):
        if t.dim() < 1 or t.shape[0] != steps:
            raise ValueError(f"{op}: {name} must stack S = {steps} meta-batches like x_support, got shape "
                             f"{list(t.shape)}")
    # every meta-batch has the first one's shapes; all the labels in range before any step changes anything
    _check_maml_args(params, lr, x_support[0], y_support[0], x_query[0], y_query[0], inner_steps, loss,
                     first_adapted_layer, per_step_lr, step_weights)
    if loss == "cross_entropy":
        for name, y in (("y_support", y_support), ("y_query", y_query)):
            _check_labels_in_range(op, name, y, params[-2].shape[0])
    losses = []
    for s in range(steps):
        losses.append(maml_mlp_meta_step_(params, lr, grads, state, x_support[s], y_support[s], x_query[s],
                                          y_query[s], inner_steps, first_order, loss, first_adapted_layer, learn_lr,
                                          optimizer, settings, per_step_lr, step_weights))
        settings = _settings_after_first_step(optimizer, settings)
    return torch.stack(losses)


def reptile_mlp_step_(params: Sequence[Tensor], x_support: Tensor, y_support: Tensor, inner_steps: int,
                      inner_lr: float, outer_lr: float, loss: str) -> Tensor:
    """A Reptile meta-step of an MLP [W0, b0, W1, b1, ...] in place: each task adapts a copy of params with
    inner_steps SGD steps of rate inner_lr on its own mean support loss, then every p += outer_lr * (the mean
    over tasks of its adapted copy - p). x_support [T, K, I]; y_support [T, K, O] (mse) or [T, K] labels.
    Returns the mean over tasks of the support loss at the first inner step."""
    rate = [torch.tensor(float(inner_lr), dtype=params[0].dtype, device=params[0].device)]
    _check_maml_args(params, rate, x_support, y_support, x_support, y_support, inner_steps, loss, 0)
    tasks = x_support.shape[0]
    fast = [p.detach().expand(tasks, *p.shape) for p in params]
    first = None
    for step in range(inner_steps):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in fast]
            losses = task_losses(mlp_forward(x_support, leaves), y_support, loss)
            grads = torch.autograd.grad(losses.sum(), leaves)
        if step == 0:
            first = losses.detach().mean()
        fast = [p - inner_lr * g for p, g in zip(fast, grads)]
    with torch.no_grad():
        for p, adapted in zip(params, fast):
            p.add_(outer_lr * (adapted.mean(0) - p))
    return first
