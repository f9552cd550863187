"""The ops in plain torch, with the compiled ops' signatures: the fallback and the test oracle.

Shapes carry an optional leading task dimension T: ``x [T, N, I]``, ``weight [T, O, I]``,
``bias [T, O]``; without it ``[N, I]``, ``[O, I]``, ``[O]``. Every function raises the same
errors as the compiled kernels (ValueError for shapes and devices, TypeError for dtypes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "linear_relu",
    "linear_relu_backward",
    "linear_relu_backward_backward",
    "sgd_step",
    "sgd_step_",
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


def _lr_for(params: Sequence[Tensor], lr: Sequence[Tensor], i: int) -> Tensor:
    return lr[0] if len(lr) == 1 else lr[i]


def _check_sgd_step_args(params: Sequence[Tensor], grads: Sequence[Tensor], lr: Sequence[Tensor]) -> None:
    if len(params) == 0:
        raise ValueError("sgd_step: params is empty")
    if len(grads) != len(params):
        raise ValueError(f"sgd_step: grads must hold one tensor per param ({len(params)}), got {len(grads)}")
    if len(lr) not in (1, len(params)):
        raise ValueError(f"sgd_step: lr must hold one tensor or one per param ({len(params)}), got {len(lr)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        rate = _lr_for(params, lr, i)
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
    return [p - _lr_for(params, lr, i) * g for i, (p, g) in enumerate(zip(params, grads))]


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
        p.sub_(_lr_for(params, lr, i) * g)
